"""Scatterbrain: a low-rank (Performer) estimate of softmax attention, corrected exactly on a sparse support.

Paper: "Scatterbrain: Unifying Sparse and Low-rank Attention Approximation", Chen, Dao, Winsor, Song, Rudra, Ré,
NeurIPS 2021, arXiv:2110.15343 (https://arxiv.org/abs/2110.15343); released code: HazyResearch/fly
(``SBLocalAttention``: a local window plus Performer features).

With the unnormalised softmax kernel ``A_ij = exp(q_i·k_j / √D)`` and its Performer estimate ``L = φ(Q) φ(K)ᵀ``
(FAVOR+ positive orthogonal random features, as `visattn.mixers.Performer`), Scatterbrain takes
``Â = L + S`` where the sparse matrix S is ``A - L`` on the support (here the sliding window of ``window`` keys
centred on each query; causal: the ``window`` keys ending at it) and 0 elsewhere:

    out_i = (Σ_j L_ij v_j + Σ_{j ∈ S_i} (A_ij - L_ij) v_j) / (Σ_j L_ij + Σ_{j ∈ S_i} (A_ij - L_ij)),

i.e. exact scores on the window and the low-rank estimate outside it (the normaliser is a sum of positive terms).
With a window that covers every key the result is exact softmax attention, whatever the features; outside the
window the error is the Performer's, which falls as the number of features grows.

Each query's terms are scaled by one factor ``exp(-c_i)``, ``c_i`` the larger of the query's largest feature
exponent and its largest exact score in the window (over visible keys only): nothing overflows, and the factor
cancels. The low-rank sums use `visattn.ops.linear_attention` (causal: prefix sums), the window is computed block
by block against a band of keys, so nothing N×N is formed. Attention dropout, as the released code, drops entries
of the exact window part (the low-rank estimate of a dropped entry then takes its place).

The released code's other sparse support (LSH / Smyrf clustering) is not offered.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_int
from ..ops._dispatch import upcast
from ..registry import register
from ._sparse_utils import _band, key_mask_of, pad_to_multiple
from .linear import Performer, _linear, _zero_padding
from .sparse import check_odd_window

__all__ = ['ScatterbrainAttention']


@register(
    'scatterbrain', paper='Scatterbrain: Unifying Sparse and Low-rank Attention Approximation', arxiv='2110.15343',
    year=2021, family='low-rank', complexity='O(N·(w + m)·C)', kind='mixer', supports_causal=True,
)
class ScatterbrainAttention(Performer):
    """Scatterbrain attention: Performer features corrected exactly on a sliding window.

    Args:
        dim, num_heads, ...: as `TokenMixer`.
        window: keys per query of the sparse support, odd, centred on the query (default 65); causal: the
            ``window`` keys ending at it.
        nb_features, feature_redraw_interval, scaling: the Performer features (see `visattn.mixers.Performer`).
        chunk_elements: about how many elements the window's largest temporary holds (default 2^20): the window is
            computed a chunk of query blocks at a time, which bounds inference memory and keeps it in cache.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask`` [B, N] bool key padding.
    """

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
            window: int = 65,
            nb_features: int | None = None,
            feature_redraw_interval: int | None = 1000,
            scaling: str = 'norm',
            chunk_elements: int = 1 << 20,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            nb_features=nb_features, feature_redraw_interval=feature_redraw_interval, scaling=scaling,
            device=device, dtype=dtype)
        self.window = check_odd_window(window)
        self.chunk_elements = check_int('chunk_elements', chunk_elements)

    def _window_part(
            self, qb: Tensor, kb: Tensor, vb: Tensor, fqb: Tensor, fkb: Tensor, mb: Tensor, hidden: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The exact-minus-low-rank correction on the window of some query blocks: its numerator [B, H, n, b, D],
        denominator [B, H, n, b] and the blocks' common shift c [B, H, n, b, 1]."""
        # fresh tensors from here on, updated in place (none is an input of its own backward)
        scores = (qb @ kb.transpose(-1, -2)).mul_(self.scale).masked_fill_(hidden, -1e30)
        c = torch.maximum(mb, scores.amax(-1, keepdim=True)).detach()  # [B, H, n, b, 1]
        exact = scores.sub_(c).exp_()  # masked pairs: 0
        if self.training and self.attn_drop.p > 0.:
            exact = self.attn_drop(exact)
        low = ((fqb * torch.exp(mb - c)) @ fkb.transpose(-1, -2)).masked_fill_(hidden, 0.)  # L on the window
        correction = low.neg_().add_(exact)  # S = A - L on the window, on the common scale exp(-c)
        return correction @ vb, correction.sum(-1), c

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        B, H, N, D = q.shape
        dtype = v.dtype
        q, k, v = upcast(q), upcast(k), upcast(v)
        fq, fk = self.features(q, k, key_padding_mask)  # fq carries exp(-m_i), m_i its largest exponent
        fk = _zero_padding(fk, key_padding_mask)
        w = self.projection.to(q.dtype)
        qc = q * D ** -0.25
        m = ((qc @ w.T + w.square().sum(-1) / 2).amax(-1, keepdim=True) - qc.square().sum(-1, keepdim=True) / 2)
        m = m.detach()  # [B, H, N, 1]: the features' shift (a per-query constant that cancels)

        left, right = (self.window - 1, 0) if is_causal else (self.window // 2, self.window // 2)
        b = min(N, max((left + right) // 2, 16))  # queries per block: a band of b + left + right keys
        nb = -(-N // b)
        lead: list[int] = [B, H, nb, b]
        qb = pad_to_multiple(q, b, -2).reshape(lead + [D])
        fqb = pad_to_multiple(fq, b, -2).reshape(lead + [fq.shape[-1]])
        mb = pad_to_multiple(m, b, -2).reshape(lead + [1])
        kb, vb, fkb = _band(k, b, left, right, True), _band(v, b, left, right, True), _band(fk, b, left, right, True)
        span = torch.arange(b + left + right, device=q.device)
        rel = span[None, :] - left - torch.arange(b, device=q.device)[:, None]  # key minus query position
        allowed = _band(key_mask_of(key_padding_mask, q), b, left, right, False).unsqueeze(-2) \
            & (rel >= -left) & (rel <= right)  # [B, 1, nb, b, span]
        hidden = ~allowed
        # the window part, a chunk of query blocks at a time (its [.., b, span] temporaries stay in cache)
        # the largest per-block tensor: the scores [b, span] or a band copy [span, D or features]
        step = max(1, self.chunk_elements // max(1, B * H * (b + left + right) * max(b, D, fq.shape[-1])))
        nums: list[Tensor] = []
        dens: list[Tensor] = []
        shifts: list[Tensor] = []
        for c0 in range(0, nb, step):
            sl = slice(c0, c0 + step)
            num, den, shift = self._window_part(qb[:, :, sl], kb[:, :, sl], vb[:, :, sl], fqb[:, :, sl],
                                                fkb[:, :, sl], mb[:, :, sl], hidden[:, :, sl])
            nums.append(num)
            dens.append(den)
            shifts.append(shift)
        num_s = torch.cat(nums, 2).flatten(2, 3)[:, :, :N]  # [B, H, N, D]
        den_s = torch.cat(dens, 2).flatten(2, 3)[:, :, :N, None]  # [B, H, N, 1]
        c = torch.cat(shifts, 2)  # [B, H, nb, b, 1]

        g = torch.exp(m - c.flatten(2, 3)[:, :, :N])  # [B, H, N, 1]: the features onto the common scale
        z = fk.cumsum(-2) if is_causal else fk.sum(-2, keepdim=True)
        den_l = (fq * z).sum(-1, keepdim=True)  # φ(q_i)·Σ_j φ(k_j)
        num_l = _linear(fq, fk, v, causal=is_causal, eps=self.eps) * (den_l + self.eps)  # φ(q_i)·Σ_j φ(k_j) v_jᵀ
        den = g * den_l + den_s  # exactly 0 only for a query that sees no key (its numerator is 0 too)
        out = (g * num_l + num_s) / torch.where(den > 0, den, torch.ones_like(den))
        return out.to(dtype)
