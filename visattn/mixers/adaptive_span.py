"""Adaptive attention span.

Paper: "Adaptive Attention Span in Transformers", Sukhbaatar, Grave, Bojanowski, Joulin, ACL 2019,
arXiv:1905.07799 (https://arxiv.org/abs/1905.07799); code: https://github.com/facebookresearch/adaptive-span.

Every head learns its span z. The soft mask ``m_z(x) = clamp((R + z - x) / R, 0, 1)`` of the distance x between
query and key (R: the ramp) scales the attention weights, which are renormalised:
``a_tr = m_z(t - r) exp(s_tr) / Σ_q m_z(t - q) exp(s_tq)``. Computed as a softmax of ``s + log m_z`` over the keys
with ``m_z > 0`` (the same function), over a band of at most ``max_span`` keys: O(N·S). As in the released code, the
band is cut where the widest mask of the heads ends (``R + max z``), so the cost follows the learnt spans; under
``torch.compile`` (and on the meta device) it stays ``max_span`` wide, a static shape.

The span is ``z = S · clamp(ρ, 0, 1)`` for a parameter ρ per head (the released code's ``current_val``, which it
clamps to [0, 1] in place after each step, `AdaptiveSpanAttention.clamp_span_` here). The clamp of the forward passes
the gradient through unchanged (a straight-through clamp), as the released code's unclamped forward does, so that a
span at 0 or S can still move; a plain clamp would stop the gradient there, and the default start ρ = 0 would never
grow. The paper's ℓ1 penalty on the spans is
`AdaptiveSpanAttention.span_penalty` (add ``λ · penalty`` to the loss; the released code: λ = 2e-6).

The released code divides by ``Σ + 1e-8`` after masking; the exact renormalisation is used here (a difference of
1e-8 relative). Distances run over the ``max_span`` previous tokens (``0 .. S - 1``, the length of the released
mask template). The paper is causal (language modelling). Without ``is_causal`` the distance is ``|t - r|``: the
span reaches z (plus the ramp) on both sides of the query (an extension for encoders such as a ViT).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_float, check_int, is_fx_proxy
from ..registry import register
from ._base import TokenMixer
from ._sparse_utils import _band, attention_lse, key_mask_of, pad_to_multiple

__all__ = ['AdaptiveSpanAttention']


@register(
    'adaptive_span', paper='Adaptive Attention Span in Transformers', arxiv='1905.07799', year=2019,
    family='sparse', complexity='O(N·S)', kind='mixer', supports_causal=True,
)
class AdaptiveSpanAttention(TokenMixer):
    """Softmax attention under a learnt soft span per head.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`).
        max_span: S, the largest span (keys at distance ``<= S - 1``; the paper's enwik8 models: 8192).
        ramp: R, the length of the soft edge of the mask (the paper: 32).
        span_init: the initial span as a fraction of S (the released code: 0, so the heads start with a span of
            about R).
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask``: [B, N] bool key padding (True = real token).
    """

    supports_key_padding = True
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
            max_span: int = 8192,
            ramp: int = 32,
            span_init: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        self.max_span = check_int('max_span', max_span)
        self.ramp = check_int('ramp', ramp)
        self.span_init = check_float('span_init', span_init, 0., 1.)
        self.span_ratio = nn.Parameter(torch.full((num_heads,), self.span_init, device=device, dtype=dtype))

    def spans(self) -> Tensor:
        """The spans z of the heads in tokens: ``[H]``, ``max_span · clamp(span_ratio, 0, 1)``; the gradient passes
        the clamp as if it were not there (at the ends of [0, 1] too, where the released code's ratio sits between
        its in-place clamps)."""
        ratio = self.span_ratio
        return (ratio + (ratio.clamp(0., 1.) - ratio).detach()) * self.max_span

    @torch.no_grad()
    def clamp_span_(self) -> None:
        """Clamp ``span_ratio`` into [0, 1] in place: the released code's ``clamp_param``, to call after each
        optimiser step (optional: the forward clamps the span anyway)."""
        self.span_ratio.clamp_(0., 1.)

    def span_penalty(self) -> Tensor:
        """The mean span of the heads in tokens (a scalar): the paper's ``(1/M) Σ z_i`` of this layer."""
        return self.spans().mean()

    def reach(self) -> int:
        """The largest distance at which some head's mask is not 0: ``ceil(R + max z) - 1`` (the released code's
        trimming of the span: the band is cut there, an exact saving, except under ``torch.compile``)."""
        return int(torch.ceil(self.spans().detach().max() + self.ramp).item()) - 1

    def soft_mask(self, distance: Tensor) -> Tensor:
        """``m_z(distance)`` for every head: ``distance [*]`` -> ``[H, *]`` (at least float32)."""
        z = self.spans()
        z = z.to(torch.promote_types(z.dtype, torch.float32)).view([-1] + [1] * distance.dim())
        return ((self.ramp + z - distance.to(z.dtype)) / self.ramp).clamp(0., 1.)

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        N = q.shape[-2]
        w = min(self.max_span - 1, max(N - 1, 0))  # keys this far from the query at most
        if self.span_ratio.device.type != 'meta':
            if torch.jit.is_scripting():
                w = min(w, self.reach())
            elif not (torch.compiler.is_compiling() or is_fx_proxy(q)):  # a static band when traced
                w = min(w, self.reach())
        key_mask = key_mask_of(key_padding_mask, q)  # [B, 1, N]
        if w >= N - 1:  # the span covers the sequence: one block of every query against every key
            qb, kb, vb = q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2)  # [B, H, 1, N, D]
            ok = key_mask.unsqueeze(2)  # [B, 1, 1, N]
            rel = torch.arange(N, device=q.device)[None, :] - torch.arange(N, device=q.device)[:, None]
        else:  # a band: blocks of b queries against the keys c·b - w .. c·b + b - 1 (+ w when not causal)
            b = min(N, max(w, 32))
            nb = -(-N // b)
            right = 0 if is_causal else w
            qb = pad_to_multiple(q, b, -2).unflatten(-2, (nb, b))  # [B, H, nb, b, D]
            kb, vb = _band(k, b, w, right, True), _band(v, b, w, right, True)  # [B, H, nb, b + w + right, D]
            ok = _band(key_mask, b, w, right, False)  # [B, 1, nb, span]
            rel = torch.arange(b + w + right, device=q.device)[None, :] - w - torch.arange(b, device=q.device)[:, None]
        distance = -rel if is_causal else rel.abs()  # [b, span]: key position minus query position, made a distance
        m = self.soft_mask(distance).unsqueeze(1)  # [H, 1, b, span]
        allowed = (distance >= 0) & (distance <= w)
        mask = ok.unsqueeze(-2) & allowed & (m > 0)  # [B, H, nb, b, span]
        bias = torch.log(m.clamp_min(1e-30))  # log 0 is never used: those pairs are masked
        out, _ = attention_lse(qb, kb, vb, mask, scale=self.scale, bias=bias,
                               dropout_p=self.attn_drop.p if self.training else 0.)
        return out.flatten(2, 3)[:, :, :N]
