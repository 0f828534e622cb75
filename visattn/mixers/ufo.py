"""UFO-ViT's softmax-free attention with cross-normalisation (XNorm).

Paper: "UFO-ViT: High Performance Linear Vision Transformer without Softmax", Song, 2021, arXiv:2109.14382
(https://arxiv.org/abs/2109.14382).

The softmax is removed and the product is factorised, keys and values first (per head, D channels):

    A(Q, K, V) = XNorm(Q) · XNorm(Kᵀ V),    XNorm(a) = γ · a / ‖a‖₂   (the l2 norm along the last axis)

so Kᵀ V [D, D] is formed once and the cost is linear in N. Q is normalised over its D channels, Kᵀ V along its
value axis (each key channel's row), with one learnable γ per head shared by the two XNorms: that is the paper's
listing as reproduced by External-Attention-pytorch (``UFOAttention``, which a test compares against with the
same weights). γ starts at 1 here (that code draws it N(0, 1)). ``qkv`` and ``proj`` are timm ``Attention``'s;
``attn_drop`` drops the mixed values (there are no attention weights). A zero vector stays zero under XNorm.

Key padding is exact: the padded keys are zeroed before Kᵀ V, so they add nothing; a sequence with no real token
mixes to zeros. The paper gives no causal form (XNorm of a running Kᵀ V would need a D×D state per token);
``is_causal=True`` is refused.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..registry import register
from ._base import TokenMixer

__all__ = ['UFOAttention', 'xnorm']


def xnorm(a: Tensor, gamma: Tensor) -> Tensor:
    """``γ · a / ‖a‖₂`` along the last axis of ``a`` [B, H, ..., D], γ [H]; a zero vector gives zeros."""
    return F.normalize(a, dim=-1) * gamma.reshape(-1, 1, 1)


@register(
    'ufo', paper='UFO-ViT: High Performance Linear Vision Transformer without Softmax', arxiv='2109.14382',
    year=2021, family='linear', complexity='O(N·C²/H)', kind='mixer',
)
class UFOAttention(TokenMixer):
    """UFO-ViT attention: ``XNorm(Q) · XNorm(Kᵀ V)`` per head, one learnable γ per head.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`).
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask`` [B, N] bool key padding (True = real token).
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
        self.gamma = nn.Parameter(torch.ones(num_heads, device=device, dtype=dtype))

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        dtype = v.dtype
        ct = torch.promote_types(dtype, torch.float32)
        q, k, v = q.to(ct), k.to(ct), v.to(ct)
        if key_padding_mask is not None:
            k = k * key_padding_mask[:, None, :, None].to(ct)
        gamma = self.gamma.to(ct)
        kv = xnorm(k.transpose(-2, -1) @ v, gamma)  # [B, H, D, D]
        return self.attn_drop((xnorm(q, gamma) @ kv).to(dtype))
