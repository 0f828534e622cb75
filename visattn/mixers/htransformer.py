"""H-Transformer-1D: hierarchical (H-matrix) attention, exact near the diagonal and coarsened level by level.

Paper: "H-Transformer-1D: Fast One-Dimensional Hierarchical Attention for Sequences", Zhu, Soricut, ACL 2021,
arXiv:2107.11906 (https://arxiv.org/abs/2107.11906).

The attention matrix is split as a hierarchical matrix with leaf blocks of ``Nr = block_size`` tokens: the sequence
is padded to ``L = Nr·2^(M+1)`` tokens (padding masked), level 0 holds the diagonal blocks and the off-diagonal
block of each pair of sibling blocks, exactly (``q_i·k_j``); level l = 1..M holds the off-diagonal blocks of the
sibling pairs of the blocks of ``2^l·Nr`` tokens, at resolution ``2^l``: queries and keys are coarsened by averaging
``2^l`` consecutive tokens (restriction), values by summing them, and each coarse score ``exp(q̄_I·k̄_J)`` stands
for every one of the ``2^l × 2^l`` fine entries (interpolation). Every pair (i, j) lies in exactly one block, so

    out_i = Σ_l P^(l) Ỹ^(l) / Σ_l P^(l) D̃^(l),   Ỹ^(l) = Ã^(l) Ṽ^(l),   D̃^(l) = Ã^(l) 1̃^(l)

(the paper's sum of the levels' numerators and of their normalisers, ``1̃`` the coarsened ones: the count of
tokens). It is computed as one softmax over the union of the levels' keys, each coarse key carrying the score bias
``log(count)`` and the mean of its values (the same numbers), with the pieces' log-sum-exps merged: exact,
whatever the scale of the scores. Padding is left out of every mean and count; a block that covers only padding
drops out. Cost O(N·Nr·C) (O(N·Nr·log(N/Nr)·C) for the causal form).

Causal form: the diagonal blocks are masked causally, and at every level a block sees only its earlier sibling.
Coarsened queries would mix the queries of later tokens into an earlier output (a coarse query is the mean of
``2^l`` queries), so the causal form keeps the fine query of each token against the coarse keys (a deviation,
needed for exact causality; ``coarsen_queries=False`` gives the same for the bidirectional form).

Against the unofficial re-implementation (lucidrains/h-transformer-1d): it leaves the count out of the coarse
normaliser (values summed, normaliser not) and stabilises each level by its own maximum before adding them; here
both follow the paper's algebra exactly.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_int
from ..ops._dispatch import upcast
from ..registry import register
from ._base import TokenMixer
from ._sparse_utils import attention_lse, key_mask_of, merge_lse

__all__ = ['HTransformer1DAttention']


def _siblings(t: Tensor, dim: int) -> Tensor:
    """Swap each pair of consecutive blocks along the block axis ``dim`` (negative; block 2b <-> 2b + 1)."""
    return t.unflatten(dim, (-1, 2)).flip(dim).flatten(dim - 1, dim)


def _pair_sums(t: Tensor) -> Tensor:
    """``[..., 2n, D] -> [..., n, D]``: sums of consecutive pairs of tokens (one coarsening step)."""
    return t.unflatten(-2, (-1, 2)).sum(-2)


@register(
    'htransformer', paper='H-Transformer-1D: Fast One-Dimensional Hierarchical Attention for Sequences',
    arxiv='2107.11906', year=2021, family='low-rank', complexity='O(N·Nr·C)', kind='mixer',
    supports_causal=True,
)
class HTransformer1DAttention(TokenMixer):
    """Hierarchical attention of H-Transformer-1D.

    Args:
        dim, num_heads, ...: as `TokenMixer`.
        block_size: Nr, the leaf block (the numerical rank of the off-diagonal blocks; default 16). With
            ``block_size >= N / 2`` level 0 covers the whole matrix: exact softmax attention.
        coarsen_queries: bidirectional form: coarsen the queries with the keys (the paper's, default); False keeps
            the fine queries (exact causality needs it, so the causal form always does).

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
            block_size: int = 16,
            coarsen_queries: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        self.block_size = check_int('block_size', block_size)
        self.coarsen_queries = bool(coarsen_queries)

    def num_blocks(self, seq_len: int) -> int:
        """Leaf blocks of the padded sequence: ``ceil(N / Nr)`` rounded up to a power of two."""
        blocks, nb = -(-seq_len // self.block_size), 1
        while nb < blocks:
            nb *= 2
        return nb

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        B, H, N, D = q.shape
        dtype = v.dtype
        nr, nb = self.block_size, self.num_blocks(N)
        length = nr * nb
        pad = length - N
        q = nn.functional.pad(upcast(q), (0, 0, 0, pad))
        k = nn.functional.pad(upcast(k), (0, 0, 0, pad))
        v = nn.functional.pad(upcast(v), (0, 0, 0, pad))
        valid = nn.functional.pad(key_mask_of(key_padding_mask, q[..., :N, :]), (0, pad), value=False)  # [B, 1, L]
        dropout_p = self.attn_drop.p if self.training else 0.
        parts = [self._level0(q, k, v, valid, nb, is_causal, dropout_p)]
        fine_q = is_causal or not self.coarsen_queries
        count = valid.to(q.dtype)  # [B, 1, L'] tokens per coarse token
        qs, ks, vs = q * count[..., None], k * count[..., None], v * count[..., None]  # masked sums
        group = 1
        while nb // group >= 4:  # levels 1..M: while the coarse blocks still form a sibling pair
            group *= 2
            qs, ks, vs = _pair_sums(qs), _pair_sums(ks), _pair_sums(vs)
            count = count.unflatten(-1, (-1, 2)).sum(-1)
            parts.append(self._coarse_level(q if fine_q else qs, ks, vs, count, nb // group, group, fine_q,
                                            is_causal, dropout_p))
        return merge_lse(parts)[..., :N, :].to(dtype)

    def _level0(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor, nb: int, is_causal: bool,
                dropout_p: float) -> tuple[Tensor, Tensor]:
        """Diagonal blocks and their siblings, exact: ``(out [B, H, L, D], lse [B, H, L])``."""
        nr = self.block_size
        # [B, H, L, D] -> [B, H, nb, Nr, D]
        qb, kb, vb = q.unflatten(-2, (nb, nr)), k.unflatten(-2, (nb, nr)), v.unflatten(-2, (nb, nr))
        mb = valid.unflatten(-1, (nb, nr))  # [B, 1, nb, Nr]
        own = torch.ones(nr, nr, dtype=torch.bool, device=q.device)
        if is_causal:
            own = own.tril()
        mask = mb.unsqueeze(-2) & own  # [B, 1, nb, Nr, Nr]
        if nb > 1:
            kb, vb = torch.cat([kb, _siblings(kb, -3)], -2), torch.cat([vb, _siblings(vb, -3)], -2)
            sib = _siblings(mb, -2).unsqueeze(-2).expand(-1, -1, -1, nr, -1)  # [B, 1, nb, Nr, Nr]
            if is_causal:  # an odd block sees its earlier sibling, an even one none
                sib = sib & (torch.arange(nb, device=q.device) % 2 == 1)[:, None, None]
            mask = torch.cat([mask, sib], -1)
        out, lse = attention_lse(qb, kb, vb, mask, scale=self.scale, dropout_p=dropout_p)
        return out.flatten(-3, -2), lse.flatten(-2)

    def _coarse_level(self, q: Tensor, ks: Tensor, vs: Tensor, count: Tensor, nb: int, group: int, fine_q: bool,
                      is_causal: bool, dropout_p: float) -> tuple[Tensor, Tensor]:
        """Sibling blocks at resolution ``group``: coarse keys (mean, score bias log(count)) and values (mean).

        Args:
            q: fine queries [B, H, L, D] (``fine_q``) or the masked sums of the queries of each coarse token.
            ks, vs: masked sums of keys and values [B, H, L / group, D]; count: real tokens in each [B, 1, L / group].
            nb: coarse blocks of Nr coarse tokens at this level.
        """
        nr = self.block_size
        seen = count > 0
        denom = count.clamp_min(1)[..., None]
        kb = _siblings((ks / denom).unflatten(-2, (nb, nr)), -3)  # [B, H, nb, Nr, D]: the sibling's coarse keys
        vb = _siblings((vs / denom).unflatten(-2, (nb, nr)), -3)
        bias = _siblings(torch.log(count.clamp_min(1)).unflatten(-1, (nb, nr)), -2).unsqueeze(-2)  # [B, 1, nb, 1, Nr]
        mask = _siblings(seen.unflatten(-1, (nb, nr)), -2).unsqueeze(-2)
        if is_causal:
            mask = mask & (torch.arange(nb, device=q.device) % 2 == 1)[:, None, None]
        if fine_q:
            qb = q.unflatten(-2, (nb, -1))  # [B, H, nb, group·Nr, D]
            out, lse = attention_lse(qb, kb, vb, mask, scale=self.scale, bias=bias, dropout_p=dropout_p)
            return out.flatten(-3, -2), lse.flatten(-2)
        qb = (q / denom).unflatten(-2, (nb, nr))  # coarse queries: means of the real queries
        out, lse = attention_lse(qb, kb, vb, mask, scale=self.scale, bias=bias, dropout_p=dropout_p)
        # [B, H, nb, Nr, D] -> [B, H, L, D]: each coarse query's result for its `group` fine queries
        return out.flatten(-3, -2).repeat_interleave(group, -2), lse.flatten(-2).repeat_interleave(group, -1)
