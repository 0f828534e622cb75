"""Sparse Sinkhorn attention, its SortCut variant and its causal form.

Paper: "Sparse Sinkhorn Attention", Tay, Bahri, Yang, Metzler, Juan, ICML 2020, arXiv:2002.11296
(https://arxiv.org/abs/2002.11296).

The sequence is cut into ``nb`` blocks of ``b = bucket_size`` tokens. A sorting network scores every pair of
blocks from their pooled (summed) representations, ``R_ij = (ψ(Q)_i W) · ψ(K)_j / sqrt(D)``, and Sinkhorn
balancing (``sinkhorn_iters`` alternate row and column normalisations in log space, temperature τ, optional
Gumbel noise while training) turns it into a doubly-stochastic soft permutation ``S``. The sorted blocks are
``ψ_S(K)_i = Σ_j S_ij K_j`` (and the same for V). The paper's sorting network is an MLP with ``nb`` outputs per
block (a fixed sequence length); here it compares blocks pairwise, so it works at any length. Memory
O(N·b + nb²).

Three forms:

- Sinkhorn attention (default): each query block attends to its own block and to the block that S sorts into its
  place, ``softmax(Q_i [ψ_S(K)_i; K_i]ᵀ) [ψ_S(V)_i; V_i]`` (the paper's local + sorted attention).
- SortCut (``sortcut_blocks=n``): the paper's truncation after sorting, ``Y = softmax(Q ψ_S(K)[:n·b]ᵀ)
  ψ_S(V)[:n·b]``: every query attends to the first ``n`` sorted blocks and to nothing else (no local block: the
  paper's equation; lucidrains' sinkhorn-transformer also keeps the query's own block). O(N·n·b).
- Causal (``is_causal=True``), the paper's causal Sinkhorn attention: local attention within the block is causal
  (query t sees the keys of its block at positions <= t); the sorting matrix is masked so that block i only
  gathers blocks j < i (block 0 gathers nothing); and the sorting network pools causally by cumulative sums:
  the representation of the gathering block i is the mean of the queries up to and including the first token
  of block i (a cumulative sum over the sequence divided by the count, so that its scale does not grow with the
  position), which is before every query of the block; the gathered block j < i keeps its plain sum (it lies
  wholly before block i). Where this departs from the paper: the paper's Causal Sinkhorn Balancing also
  normalises the masked matrix by columns, but a column normalisation sums over the later blocks, so what block
  i gathers would depend on the blocks after it (a leak from the future, which visattn's causal contract
  forbids); the causal sorting matrix here is the masked row softmax over the earlier blocks (one row
  normalisation; ``sinkhorn_iters`` does not apply), which is also what the authors' released Long Range Arena
  code does by default (``sort_activation='softmax'``) and what lucidrains' sinkhorn-transformer does.
  SortCut has no causal form (the first sorted blocks are seen by every query): a causal call raises a
  ``ValueError``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_float, check_int, masked_softmax_fp32
from ..ops._dispatch import upcast
from ..registry import register
from ._base import TokenMixer
from ._sparse_utils import attention_lse, key_mask_of, pad_to_multiple

__all__ = ['SinkhornAttention']


def sinkhorn(log_alpha: Tensor, iters: int) -> Tensor:
    """Sinkhorn balancing in log space of ``[..., n, n]`` logits; returns the (near) doubly-stochastic matrix."""
    for _ in range(iters):
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=-1, keepdim=True)
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=-2, keepdim=True)
    return log_alpha.exp()


@register(
    'sinkhorn', paper='Sparse Sinkhorn Attention', arxiv='2002.11296', year=2020, family='sorting',
    complexity='O(N·b + (N/b)²)', kind='mixer', supports_causal=True,
)
class SinkhornAttention(TokenMixer):
    """Block attention to the own block and the Sinkhorn-sorted block (or, with SortCut, to the first sorted blocks).

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`).
        bucket_size: tokens per block b.
        sinkhorn_iters: Sinkhorn normalisation rounds (the paper: 2 to 10); not used by the causal form.
        temperature: τ dividing the sorting logits (the paper: 0.75).
        gumbel_noise: add Gumbel noise to the sorting logits while training (the paper); off by default so that
            the module is a deterministic function.
        sortcut_blocks: SortCut budget n: every query attends to the first n sorted blocks only (capped at the
            number of blocks); None (default) is Sinkhorn attention. Not causal.
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
            bucket_size: int = 64,
            sinkhorn_iters: int = 8,
            temperature: float = 0.75,
            gumbel_noise: bool = False,
            sortcut_blocks: int | None = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        self.bucket_size = check_int('bucket_size', bucket_size)
        self.sinkhorn_iters = check_int('sinkhorn_iters', sinkhorn_iters)
        self.temperature = check_float('temperature', temperature, 0., None, low_open=True)
        self.gumbel_noise = gumbel_noise
        self.sortcut_blocks = None if sortcut_blocks is None else check_int('sortcut_blocks', sortcut_blocks)
        self.sort_net = nn.Linear(self.head_dim, self.head_dim, bias=False, device=device, dtype=dtype)

    def sorting_matrix(self, q: Tensor, k: Tensor, key_mask: Tensor, causal: bool = False) -> Tensor:
        """Soft block permutation ``[B, H, nb, nb]`` from blocked ``q``, ``k`` ``[B, H, nb, b, D]`` and
        ``key_mask [B, 1, nb, b]`` (padding is left out of the pooled block representations).

        ``causal``: row i pools the queries up to the first token of block i (a cumulative mean), only the
        columns j < i are kept, and the matrix is their row softmax (block 0's row is zeros).
        """
        w = key_mask.unsqueeze(-1).to(q.dtype)
        keys = (k * w).sum(-2)  # [B, H, nb, D]
        if causal:
            total = (q * w).flatten(2, 3).cumsum(2).unflatten(2, (q.shape[2], q.shape[3]))  # [B, H, nb, b, D]
            count = w.flatten(2, 3).cumsum(2).unflatten(2, (q.shape[2], q.shape[3]))
            queries = total[:, :, :, 0] / count[:, :, :, 0].clamp_min(1)  # through the first token of each block
        else:
            queries = (q * w).sum(-2)
        logits = upcast(torch.matmul(self.sort_net(queries), keys.transpose(-1, -2)))
        logits = logits * self.scale
        if self.gumbel_noise and self.training:
            u = torch.rand_like(logits).clamp(1e-9, 1 - 1e-9)
            logits = logits - torch.log(-torch.log(u))
        logits = logits / self.temperature
        if causal:
            nb = logits.shape[-1]
            earlier = torch.ones(nb, nb, dtype=torch.bool, device=logits.device).tril(-1)
            return masked_softmax_fp32(logits, earlier.expand_as(logits)).to(logits.dtype)
        return sinkhorn(logits, self.sinkhorn_iters)

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        n_cut = self.sortcut_blocks
        if is_causal and n_cut is not None:
            raise ValueError(f'SinkhornAttention with sortcut_blocks={n_cut} (SortCut) cannot honour is_causal=True: '
                             'every query sees the first sorted blocks; build it with sortcut_blocks=None')
        N = q.shape[-2]
        b = min(self.bucket_size, N)
        nb = -(-N // b)
        key_mask = pad_to_multiple(key_mask_of(key_padding_mask, q), b, -1, False).unflatten(-1, (nb, b))
        qb = pad_to_multiple(q, b, -2).unflatten(-2, (nb, b))  # [B, H, nb, b, D]
        kb = pad_to_multiple(k, b, -2).unflatten(-2, (nb, b))
        vb = pad_to_multiple(v, b, -2).unflatten(-2, (nb, b))
        sort = self.sorting_matrix(qb, kb, key_mask, is_causal)  # [B, H, nb, nb]
        if n_cut is not None:  # SortCut keeps the first n_cut sorted blocks only
            sort = sort[:, :, :min(n_cut, nb)]
        w = key_mask.to(sort.dtype)
        ks = torch.einsum('bhij,bhjtd->bhitd', sort.to(k.dtype), kb * w.unsqueeze(-1).to(k.dtype))
        vs = torch.einsum('bhij,bhjtd->bhitd', sort.to(v.dtype), vb * w.unsqueeze(-1).to(v.dtype))
        weight = torch.einsum('bhij,bzjt->bhit', sort, w)  # [B, H, nb, b]: how much real token each sorted key holds
        bias = torch.log(weight.clamp_min(1e-30))
        dropout_p = self.attn_drop.p if self.training else 0.
        if n_cut is not None:  # SortCut: every query against the first n_cut sorted blocks
            out, _ = attention_lse(
                q, ks.flatten(2, 3), vs.flatten(2, 3), (weight > 0).flatten(2)[:, :, None], scale=self.scale,
                bias=bias.flatten(2)[:, :, None], dropout_p=dropout_p)  # keys [B, H, n_cut·b, D]
            return out
        if is_causal:  # the sorted block (of earlier blocks only) whole, the own block up to the query
            up_to = torch.ones(b, b, dtype=torch.bool, device=q.device).tril()  # [query, key]: key <= query
            local = key_mask.expand_as(weight).unsqueeze(-2) & up_to
            mask = torch.cat([(weight > 0).unsqueeze(-2).expand_as(local), local], dim=-1)  # [B, H, nb, b, 2b]
        else:
            mask = torch.cat([weight > 0, key_mask.expand_as(weight)], dim=-1).unsqueeze(-2)  # [B, H, nb, 1, 2b]
        bias = torch.cat([bias, torch.zeros_like(weight)], dim=-1).unsqueeze(-2)
        out, _ = attention_lse(
            qb, torch.cat([ks, kb], dim=-2), torch.cat([vs, vb], dim=-2), mask, scale=self.scale, bias=bias,
            dropout_p=dropout_p)
        return out.flatten(2, 3)[:, :, :N]
