"""MobileViTv2's separable self-attention in token form.

Paper: "Separable Self-attention for Mobile Vision Transformers", Mehta, Rastegari, TMLR 2023,
arXiv:2206.02680 (https://arxiv.org/abs/2206.02680). Official code: apple/ml-cvnets
(``cvnets/layers/linear_attention.py``); timm: ``timm.models.mobilevit.LinearSelfAttention``.

For tokens x [N, d] (section 3.2 of the paper):

    c_s = softmax_N(x W_I)                  context scores, W_I [d, 1]: one score per token, softmax over the tokens
    c_v = Σ_i c_s(i) x_K(i),  x_K = x W_K   the context vector [d], a score-weighted sum of the keys
    y   = (ReLU(x W_V) ⊙ c_v) W_O           broadcast over the tokens, then the output projection

O(N·d): no N×N map. ``qkv`` [1 + 2d, d] holds W_I, W_K, W_V in that order (timm's ``qkv_proj`` of the 2-D form,
a 1×1 convolution, with its weight squeezed), ``proj`` is W_O (timm's ``out_proj``); ``attn_drop`` drops the
context scores, as timm and ml-cvnets do.

The paper has one context score per token (``multi_head=False``, the default); ``multi_head=True`` gives each of
the ``num_heads`` heads its own score and context vector over its d/h channels (``qkv`` [h + 2d, d]), a
generalisation that is not in the paper. ``qk_norm`` normalises the keys per head (the scores are scalars).
Key padding is exact: padded tokens get a score of -inf, so they weigh nothing in c_v; a sequence with no real
token gets c_v = 0. The paper gives no causal form; ``is_causal=True`` is refused.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..registry import register
from ._base import TokenMixer, masked_softmax

__all__ = ['SeparableSelfAttention']


@register(
    'separable', paper='Separable Self-attention for Mobile Vision Transformers', arxiv='2206.02680', year=2022,
    family='linear', complexity='O(N·C)', kind='mixer',
)
class SeparableSelfAttention(TokenMixer):
    """Separable self-attention: softmax context scores over the tokens, one context vector, gated values.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`; the heads matter only with ``multi_head`` and ``qk_norm``).
        multi_head: one context score per head instead of the paper's single one (default False).
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
            multi_head: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            use_qkv=False, device=device, dtype=dtype)
        self.multi_head = bool(multi_head)
        self.num_scores = num_heads if self.multi_head else 1
        self.qkv = nn.Linear(dim, self.num_scores + 2 * dim, bias=qkv_bias, device=device, dtype=dtype)
        self.q_norm = nn.Identity()  # the context scores are scalars: nothing to normalise

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        kpm, _ = self.check_input(x, attn_mask, is_causal)
        B, N, C = x.shape
        G = self.num_scores
        ct = torch.promote_types(x.dtype, torch.float32)
        scores, k, v = self.qkv(x).split([G, C, C], dim=-1)
        k = self.k_norm(k.reshape(B, N, self.num_heads, self.head_dim)).reshape(B, N, G, C // G)
        probs = masked_softmax(scores.to(ct).transpose(1, 2)[:, :, None], kpm)[:, :, 0]  # [B, G, N], over tokens
        probs = self.attn_drop(probs)
        context = torch.einsum('bgn,bngd->bgd', probs, k.to(ct))  # [B, G, C/G]
        out = F.relu(v.to(ct)) * context.reshape(B, 1, C)
        return self.proj_drop(self.proj(self.norm(out.to(x.dtype))))
