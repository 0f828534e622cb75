"""Star-Transformer attention.

Paper: "Star-Transformer", Guo, Qiu, Liu, Shao, Xue, Zhang, NAACL 2019, arXiv:1902.09113
(https://arxiv.org/abs/1902.09113).

The fully connected graph is replaced by a star: satellite i attends to its ring neighbours ``i-1, i, i+1``
and to a relay node s, and the relay connects every pair in two hops. The relay starts as the mean of the
tokens (``s⁰ = mean(E)``, the paper's initialisation) and is projected by the same ``qkv``. One mixer call is
one update of the satellites (the first cycle of the paper, where the token embedding ``e_i`` equals ``h_i``
and is therefore counted once); stacking layers gives the cycles. O(N).
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from ..registry import register
from ._base import TokenMixer
from ._sparse_utils import attention_lse, key_mask_of, merge_lse, window_attention_lse

__all__ = ['StarAttention']


@register(
    'star', paper='Star-Transformer', arxiv='1902.09113', year=2019, family='sparse', complexity='O(N)',
    kind='mixer',
)
class StarAttention(TokenMixer):
    """Ring + relay attention.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`).
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask``: [B, N] bool key padding (True = real token; the relay is the
        mean of the real tokens).
    """

    supports_key_padding = True

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            scale_norm: bool = False,
            proj_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            norm_layer: type[nn.Module] | None = None,
            *,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        kpm, _ = self.check_input(x, attn_mask, is_causal)
        q, k, v = self.split_heads(x)
        key_mask = key_mask_of(kpm, q)  # [B, 1, N]
        w = key_mask.transpose(1, 2).to(x.dtype)  # [B, N, 1]
        relay = (x * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)  # [B, 1, C]
        _, ks, vs = self.split_heads(relay)  # [B, H, 1, D]
        dropout_p = self.attn_drop.p if self.training else 0.
        ring = window_attention_lse(q, k, v, window=1, key_mask=key_mask, scale=self.scale, dropout_p=dropout_p)
        hub = attention_lse(q, ks, vs, None, scale=self.scale, dropout_p=dropout_p)
        return self.merge_heads(merge_lse([ring, hub]))
