"""Sparse Sinkhorn attention.

Paper: "Sparse Sinkhorn Attention", Tay, Bahri, Yang, Metzler, Juan, ICML 2020, arXiv:2002.11296
(https://arxiv.org/abs/2002.11296).

The sequence is cut into blocks of ``bucket_size`` tokens. A sorting network scores every pair of blocks
from their pooled (summed) representations, ``R_ij = (ψ(Q)_i W) · ψ(K)_j / sqrt(D)``, and Sinkhorn balancing
(``sinkhorn_iters`` alternate row and column normalisations in log space, temperature τ, optional Gumbel
noise while training) turns it into a doubly-stochastic soft permutation. Each query block attends to its
own block and to the block that R sorts into its place, ``Σ_j R_ij K_j`` (the paper's local + sorted
attention). The sorting network here compares blocks pairwise, so it works at any sequence length.
Memory O(N·b + (N/b)²).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_float, check_int
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
    complexity='O(N·b + (N/b)²)', kind='mixer',
)
class SinkhornAttention(TokenMixer):
    """Block attention to the own block and the Sinkhorn-sorted block.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`).
        bucket_size: tokens per block b.
        sinkhorn_iters: Sinkhorn normalisation rounds (the paper: 2 to 10).
        temperature: τ dividing the sorting logits (the paper: 0.75).
        gumbel_noise: add Gumbel noise to the sorting logits while training (the paper); off by default so that
            the module is a deterministic function.
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask``: [B, N] bool key padding (True = real token).
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
            bucket_size: int = 64,
            sinkhorn_iters: int = 8,
            temperature: float = 0.75,
            gumbel_noise: bool = False,
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
        self.sort_net = nn.Linear(self.head_dim, self.head_dim, bias=False, device=device, dtype=dtype)

    def sorting_matrix(self, q: Tensor, k: Tensor, key_mask: Tensor) -> Tensor:
        """Soft block permutation ``[B, H, nb, nb]`` from blocked ``q``, ``k`` ``[B, H, nb, b, D]`` and
        ``key_mask [B, 1, nb, b]`` (padding is left out of the pooled block representations)."""
        w = key_mask.unsqueeze(-1).to(q.dtype)
        logits = upcast(torch.matmul(self.sort_net((q * w).sum(-2)), (k * w).sum(-2).transpose(-1, -2)))
        logits = logits * self.scale
        if self.gumbel_noise and self.training:
            u = torch.rand_like(logits).clamp(1e-9, 1 - 1e-9)
            logits = logits - torch.log(-torch.log(u))
        return sinkhorn(logits / self.temperature, self.sinkhorn_iters)

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        N = q.shape[-2]
        b = min(self.bucket_size, N)
        nb = -(-N // b)
        key_mask = pad_to_multiple(key_mask_of(key_padding_mask, q), b, -1, False).unflatten(-1, (nb, b))
        qb, kb, vb = (pad_to_multiple(t, b, -2).unflatten(-2, (nb, b)) for t in (q, k, v))  # [B, H, nb, b, D]
        sort = self.sorting_matrix(qb, kb, key_mask)  # [B, H, nb, nb]
        w = key_mask.to(sort.dtype)
        ks = torch.einsum('bhij,bhjtd->bhitd', sort.to(k.dtype), kb * w.unsqueeze(-1).to(k.dtype))
        vs = torch.einsum('bhij,bhjtd->bhitd', sort.to(v.dtype), vb * w.unsqueeze(-1).to(v.dtype))
        weight = torch.einsum('bhij,bzjt->bhit', sort, w)  # [B, H, nb, b]: how much real token each sorted key holds
        mask = torch.cat([weight > 0, key_mask.expand_as(weight)], dim=-1).unsqueeze(-2)
        bias = torch.cat([torch.log(weight.clamp_min(1e-30)), torch.zeros_like(weight)], dim=-1).unsqueeze(-2)
        dropout_p = self.attn_drop.p if self.training else 0.
        out, _ = attention_lse(
            qb, torch.cat([ks, kb], dim=-2), torch.cat([vs, vb], dim=-2), mask, scale=self.scale, bias=bias,
            dropout_p=dropout_p)
        return out.flatten(2, 3)[:, :, :N]
