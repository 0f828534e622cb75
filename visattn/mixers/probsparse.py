"""Informer's ProbSparse self-attention.

Paper: "Informer: Beyond Efficient Transformer for Long Sequence Time-Series Forecasting", Zhou et al.,
AAAI 2021, arXiv:2012.07436 (https://arxiv.org/abs/2012.07436).

Only the ``u = c·ln N`` most "active" queries attend. The activity of query i is the sparsity measurement
``M(q_i, K) = max_j(q_i·k_j/√d) - mean_j(q_i·k_j/√d)``, estimated on ``c·ln N`` keys sampled per query; the
other ("lazy") queries output the mean of the values. Padded queries are never chosen. O(N·log N).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_int
from ..ops._dispatch import upcast
from ..registry import register
from ._base import TokenMixer, softmax_attention
from ._sparse_utils import (
    SeededMixin,
    ceil_log,
    gather_rows,
    hash_bits,
    key_mask_of,
)

__all__ = ['ProbSparseAttention']

QUERY_CHUNK = 2048  # queries per chunk of the sparsity estimate (``ProbSparseAttention.query_chunk``)


@register(
    'probsparse', paper='Informer: Beyond Efficient Transformer for Long Sequence Time-Series Forecasting',
    arxiv='2012.07436', year=2021, family='sparse', complexity='O(N·log N)', kind='mixer',
)
class ProbSparseAttention(SeededMixin, TokenMixer):
    """ProbSparse attention: the top-u queries by the sparsity measurement attend, the others take mean(V).

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`).
        factor: c, the sampling factor (the paper: 5): ``u = c·ceil(ln N)`` queries and as many sampled keys,
            both capped at N (u = N is full attention).
        seed: seed of the key sampling (default None: drawn from torch's generator at construction, so every
            layer differs; kept in the state dict, see `SeededMixin`).
        resample_each_forward: draw new key samples at every training forward (as Informer's code); the
            default draws from ``seed``, so that the module is a deterministic function.
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask``: [B, N] bool key padding (True = real token).
    """

    __constants__ = TokenMixer.__constants__ + ['query_chunk']
    supports_key_padding = True
    query_chunk = QUERY_CHUNK

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
            factor: int = 5,
            seed: int | None = None,
            resample_each_forward: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        self.factor = check_int('factor', factor)
        self.init_seed(seed)
        self.resample_each_forward = resample_each_forward

    def sparsity(self, q: Tensor, k: Tensor, key_mask: Tensor) -> Tensor:
        """Estimated ``M(q_i, K)`` ``[B, H, N]`` from ``factor·ceil(ln N)`` keys sampled per query (no gradient)."""
        with torch.no_grad():
            return self._sparsity(q, k, key_mask)

    def _sparsity(self, q: Tensor, k: Tensor, key_mask: Tensor) -> Tensor:
        N = q.shape[-2]
        n_sample = min(N, self.factor * ceil_log(N))
        if self.resample_each_forward and self.training:
            idx = torch.randint(N, (N, n_sample), device=q.device)
        else:
            idx = (hash_bits(self.seed, [N, n_sample]) % N).to(q.device)
        ms = []
        for start in range(0, N, self.query_chunk):  # chunks of queries bound the [.., n, n_sample, D] gather
            chunk = idx[start:start + self.query_chunk]  # [n, n_sample]
            ks = k[:, :, chunk]  # [B, H, n, n_sample, D]
            s = upcast(torch.einsum('bhnd,bhnsd->bhns', q[:, :, start:start + self.query_chunk], ks)) * self.scale
            valid = key_mask[:, :, chunk]  # [B, 1, n, n_sample]
            top = s.masked_fill(~valid, float('-inf')).amax(-1)
            mean = (s * valid).sum(-1) / valid.sum(-1).clamp_min(1)
            ms.append(torch.where(valid.any(-1), top - mean, torch.full_like(top, float('-inf'))))
        return torch.cat(ms, dim=-1)

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        N = q.shape[-2]
        u = min(N, self.factor * ceil_log(N))
        key_mask = key_mask_of(key_padding_mask, q)
        m = self.sparsity(q, k, key_mask).masked_fill(~key_mask, float('-inf'))  # padded queries come last
        top = m.topk(u, dim=-1).indices  # [B, H, u]
        active = softmax_attention(gather_rows(q, top), k, v, key_padding_mask=key_padding_mask,
                                   dropout_p=self.attn_drop.p if self.training else 0., scale=self.scale)
        w = key_mask.unsqueeze(-1).to(v.dtype)
        lazy = (v * w).sum(-2, keepdim=True) / w.sum(-2, keepdim=True).clamp_min(1)  # [B, H, 1, D]
        out = lazy.expand_as(v).contiguous()
        return out.scatter(-2, top.unsqueeze(-1).expand(list(top.shape) + [v.shape[-1]]), active.to(out.dtype))
