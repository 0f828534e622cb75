"""Combiner: full attention at sub-quadratic cost through a structured factorisation of the attention distribution.

Paper: "Combiner: Full Attention Transformer with Sparse Computation Cost", Ren, Dai, Dai, Yang, Leskovec,
Schuurmans, Dai, NeurIPS 2021, arXiv:2107.05768 (https://arxiv.org/abs/2107.05768); released code:
https://github.com/google-research/google-research/tree/master/combiner.

Attention as a conditional expectation ``out_i = Σ_j p(j | i) v_j`` with p factorised over a partition of the
keys into a direct support Ω_i⁰ and regions Ω_i^r:

    out_i = Σ_{j ∈ Ω_i⁰} p(j | i) v_j + Σ_r p(Ω_i^r | i) Σ_{j ∈ Ω_i^r} q(j | Ω_i^r) v_j,

where ``p(j | i) ∝ exp(q_i·k_j)`` and ``p(Ω^r | i) ∝ exp(q_i·k̃_r)`` share one normaliser (a single softmax over
the direct keys and the region summaries) and ``q(j | Ω^r) = softmax_{j ∈ Ω^r}(q̃_r·k_j)`` is the region's own
distribution (its summary value ``Σ q(j | Ω^r) v_j``). Every key is reached, directly or through its region.
Two of the paper's instantiations (``variant``):

- ``'axial'`` (Combiner-Axial, the default; the released ``axial_rowmajor``): the sequence is laid out row-major
  in rows of ``segment_size`` tokens (default ``ceil(√N)``). Ω_i⁰ is the row of i; every other row is a region,
  reached through the token of that row in the column of i: its key is the region key ``k̃``, and its row
  attention (its own query against its row) is the region's distribution. Where N is not a multiple of m, the
  columns missing from the short last row borrow its last token (so that every key stays reachable; the released
  code takes N divisible by m). Cost O(N·(m + N / m)).
- ``'fixed'`` (Combiner-Fixed, the released ``sqrt_fixed_full``): segments of ``segment_size`` tokens. Ω_i⁰ is
  the segment of i; every other segment is a region with key ``k̃ = max`` of its keys and distribution query
  ``q̃ = max`` of its queries (the released code's ``'identity-max'`` pooling).

Causal form (the paper's autoregressive setting): the direct part is causal (``j <= i``) and only earlier rows /
segments are regions, so no later token is reached. Bidirectional: every other row or segment is a region (the
released bidirectional calls of these two functions also give the query's own row or segment as a region, on top
of its direct attention; here the partition is kept exact, as the paper's). Padded tokens leave every max-pooling,
row attention and softmax; a region reached through a padded column token (axial) or made only of padding drops
out. The released axial LM configuration summarises a row with an extra learned projection (``row_summary='proj'``),
not offered: here the region key is the column token's own key (its ``'none'``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_int
from ..ops._dispatch import upcast
from ..registry import register
from ._base import TokenMixer
from ._sparse_utils import attention_lse, key_mask_of, merge_lse, pad_to_multiple

__all__ = ['CombinerAttention']


@register(
    'combiner', paper='Combiner: Full Attention Transformer with Sparse Computation Cost', arxiv='2107.05768',
    year=2021, family='sparse', complexity='O(N·√N·C)', kind='mixer', supports_causal=True,
)
class CombinerAttention(TokenMixer):
    """Combiner attention (Combiner-Axial or Combiner-Fixed).

    Args:
        dim, num_heads, ...: as `TokenMixer`.
        variant: ``'axial'`` (default) or ``'fixed'``; see the module docstring.
        segment_size: row (axial) or segment (fixed) length m; None (default): ``ceil(√N)`` at each call.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask`` [B, N] bool key padding.
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
            variant: str = 'axial',
            segment_size: int | None = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        if variant not in ('axial', 'fixed'):
            raise ValueError(f"variant must be 'axial' or 'fixed', got {variant!r}")
        self.variant = variant
        self.segment_size = None if segment_size is None else check_int('segment_size', segment_size)

    def segment_for(self, seq_len: int) -> int:
        """The row / segment length m used for ``seq_len`` tokens."""
        size = self.segment_size
        if size is None:
            return max(1, int(math.ceil(math.sqrt(seq_len))))
        return size

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        N = q.shape[-2]
        dtype = v.dtype
        m = self.segment_for(N)
        q, k, v = upcast(q), upcast(k), upcast(v)
        real = pad_to_multiple(key_mask_of(key_padding_mask, q), m, -1, 0.).unflatten(-1, (-1, m))  # [B, 1, R, m]
        qs = pad_to_multiple(q, m, -2).unflatten(-2, (-1, m))  # [B, H, R, m, D]
        ks = pad_to_multiple(k, m, -2).unflatten(-2, (-1, m))
        vs = pad_to_multiple(v, m, -2).unflatten(-2, (-1, m))
        dropout_p = self.attn_drop.p if self.training else 0.
        within = torch.ones(m, m, dtype=torch.bool, device=q.device)
        if is_causal:
            within = within.tril()
        direct = attention_lse(qs, ks, vs, real.unsqueeze(-2) & within, scale=self.scale, dropout_p=dropout_p)
        R = qs.shape[-3]
        rows = torch.arange(R, device=q.device)
        other = rows[None, :] < rows[:, None] if is_causal else rows[None, :] != rows[:, None]  # [R(query), R]
        if self.variant == 'axial':
            # each token's row attention over its whole row: the distribution of the region it stands for
            summary = attention_lse(qs, ks, vs, real.unsqueeze(-2), scale=self.scale)[0]  # [B, H, R, m, D]
            # the token of each row in each column; a short last row lends its last token to the missing columns
            col = torch.arange(R * m, device=q.device).clamp(max=N - 1)
            k_col = ks.flatten(-3, -2).index_select(-2, col).unflatten(-2, (R, m))
            s_col = summary.flatten(-3, -2).index_select(-2, col).unflatten(-2, (R, m))
            real_col = real.flatten(-2).index_select(-1, col).unflatten(-1, (R, m))
            # column attention: query (row a, column c) against the tokens (row b, column c), b in the regions
            mask = real_col.transpose(-1, -2).unsqueeze(-2) & other  # [B, 1, m, R(query), R]
            out, lse = attention_lse(qs.transpose(-2, -3), k_col.transpose(-2, -3), s_col.transpose(-2, -3), mask,
                                     scale=self.scale, dropout_p=dropout_p)
            regions = (out.transpose(-2, -3), lse.transpose(-1, -2))
        else:
            fill = ~real.unsqueeze(-1)  # [B, 1, R, m, 1]
            seen = real.any(-1)  # [B, 1, R]: the segment holds a real token
            empty = ~seen[..., None, None]
            # max over the real tokens of each segment (0 for a segment of padding, which is masked)
            q_region = qs.masked_fill(fill, -1e30).amax(-2, keepdim=True).masked_fill(empty, 0.)  # [B, H, R, 1, D]
            k_region = ks.masked_fill(fill, -1e30).amax(-2, keepdim=True).masked_fill(empty, 0.)
            summary = attention_lse(q_region, ks, vs, real.unsqueeze(-2), scale=self.scale)[0]  # [B, H, R, 1, D]
            mask = seen[:, :, None, None, :] & other[:, None, :]  # [B, 1, R(query), 1, R]
            # every query of segment a against the R region keys: [B, H, R, m, D] x [B, H, 1, R, D]
            out, lse = attention_lse(qs, k_region.transpose(-2, -3), summary.transpose(-2, -3), mask,
                                     scale=self.scale, dropout_p=dropout_p)
            regions = (out, lse)
        out = merge_lse([direct, regions]).flatten(-3, -2)[..., :N, :]
        return out.to(dtype)
