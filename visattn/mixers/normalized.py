"""Normalized attention pooling (NAP): the softmax replaced by a normalisation of the logits.

Paper: "Normalized Attention Without Probability Cage", Oliver Richter, Roger Wattenhofer, arXiv 2020,
arXiv:2005.09561 (https://arxiv.org/abs/2005.09561). The authors' released layer is a PyTorch-Geometric
``TransformerConv(model='NAP')`` (graph attention over a node's neighbours); the equations below are that layer's,
applied to every query over its visible keys.

Softmax weights lie on the probability simplex, so an attention output is a convex combination of the values (the
"probability cage"). NAP keeps the dot-product logits ``s_ij = q_i · k_j`` of each head and normalises them over
the keys of each query instead, then applies a learned gain g and shift b per head:

    μ_i = (1/n_i) Σ_j s_ij,    σ_i² = (Σ_j (s_ij - μ_i)² + ε) / n_i,
    a_ij = g · (s_ij - μ_i) / σ_i + b,    out_i = Σ_j a_ij v_j,

with n_i the number of keys query i sees (the population deviation, over n_i, not n_i - 1). The weights of a row
have mean b and deviation |g| over its keys, can be negative and do not sum to 1. Normalising makes the logits
scale-free, so there is no ``1/sqrt(D)`` factor (the code applies none for NAP). g starts at 1 and b at 0, as in
the code; ``affine=False`` fixes them there. ε is added to the sum of squares, as in the code (``1e-16``), so that
a row of equal logits gives zero weights instead of 0/0.

Masks: the statistics run over the visible keys of each row only (a float mask is added to the logits first; its
-inf entries hide the pair); hidden pairs get weight 0, also the shift b, so nothing a mask hides reaches an output,
and a row that sees no key gives zeros. With ``is_causal`` query i normalises over keys j <= i (query 0 sees one
key: its normalised logit is 0 and its weight is b).

Without attention dropout the weights a are not formed, only the deviations:
``out_i = (g / σ_i) Σ_j (s_ij - μ_i) v_j + b Σ_(visible j) v_j``.

Not offered: the released code's un-normalised ``NON`` variant (``s_ij / sqrt(n_i)``) and the layer around the
pooling there (LayerNorm and GELU on the pooled output before the mixing layer, here ``proj``): a ViT block brings
its own norms; ``scale_norm=True`` gives the LayerNorm.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_float
from ..registry import register
from ._base import TokenMixer, combine_masks

__all__ = ['NormalizedAttention', 'split_mask']


def split_mask(mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """A combined mask (see `combine_masks`) as ``(visible, bias)``: the bool pairs a query sees and the float
    scores to add to the logits (0 where hidden); None where the mask does not give one."""
    if mask is None:
        return None, None
    if mask.dtype == torch.bool:
        return mask, None
    visible = ~torch.isneginf(mask)
    return visible, mask.masked_fill(~visible, 0.)


@register(
    'normalized', paper='Normalized Attention Without Probability Cage', arxiv='2005.09561', year=2020,
    family='softmax', complexity='O(N²·C)', kind='mixer', supports_causal=True,
)
class NormalizedAttention(TokenMixer):
    """Attention whose weights are the logits normalised over the keys (NAP; see the module docstring).

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`).
        eps: added to the sum of squared deviations of a row (the released code: 1e-16); > 0.
        affine: learn the gain g (init 1) and shift b (init 0) of every head; False fixes them at 1 and 0.
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask`` [B, N] bool (True = real token) or broadcastable to
        [B, H, N, N] (SDPA's convention).
    """

    supports_key_padding = True
    supports_dense_mask = True
    supports_causal = True

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
            eps: float = 1e-16,
            affine: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        dd = dict(device=device, dtype=dtype)
        self.eps = check_float('eps', eps, 0., low_open=True)
        self.affine = affine
        if affine:
            self.gain = nn.Parameter(torch.ones(num_heads, **dd))
            self.shift = nn.Parameter(torch.zeros(num_heads, **dd))
        else:
            self.register_buffer('gain', torch.ones(num_heads, **dd), persistent=False)
            self.register_buffer('shift', torch.zeros(num_heads, **dd), persistent=False)

    def deviations(
            self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None, is_causal: bool,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(s - μ, 1/σ, visible)`` of the logits of ``q``, ``k`` [B, H, N, D]: [B, H, N, N] (0 at hidden pairs),
        [B, H, N, 1] (at least float32), and the visible pairs (None: every pair)."""
        ct = torch.promote_types(q.dtype, torch.float32)
        s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2))  # [B, H, N, N]
        visible, bias = split_mask(combine_masks(key_padding_mask, attn_mask, is_causal, k.shape[-2], q.device))
        if bias is not None:
            s = s + bias.to(ct)
        if visible is None:
            d = s - s.mean(-1, keepdim=True)
            var = (d.square().sum(-1, keepdim=True) + self.eps) / s.shape[-1]
        else:
            n = visible.sum(-1, keepdim=True).clamp_min(1).to(ct)
            s = s.masked_fill(~visible, 0.)
            d = (s - s.sum(-1, keepdim=True) / n).masked_fill(~visible, 0.)
            var = (d.square().sum(-1, keepdim=True) + self.eps) / n
        return d, torch.rsqrt(var), visible

    def weights(
            self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None, is_causal: bool,
    ) -> Tensor:
        """The normalised weights ``a`` [B, H, N, N] (at least float32) of ``q``, ``k`` [B, H, N, D]."""
        d, r, visible = self.deviations(q, k, key_padding_mask, attn_mask, is_causal)
        a = d * r * self.gain.to(d.dtype)[:, None, None] + self.shift.to(d.dtype)[:, None, None]
        return a if visible is None else a.masked_fill(~visible, 0.)

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        if self.training and self.attn_drop.p > 0.:  # dropout acts on the weights: form them
            a = F.dropout(self.weights(q, k, key_padding_mask, attn_mask, is_causal), self.attn_drop.p, True)
            return torch.matmul(a.to(v.dtype), v)
        # Σ_j (g (s_ij - μ_i) / σ_i + b) v_j = (g / σ_i) Σ_j (s_ij - μ_i) v_j + b Σ_(visible j) v_j: no N x N weights
        d, r, visible = self.deviations(q, k, key_padding_mask, attn_mask, is_causal)
        vc = v.to(d.dtype)
        total = vc.sum(-2, keepdim=True) if visible is None else torch.matmul(visible.to(d.dtype), vc)
        gain, shift = self.gain.to(d.dtype)[:, None, None], self.shift.to(d.dtype)[:, None, None]
        return (torch.matmul(d, vc) * (r * gain) + shift * total).to(v.dtype)
