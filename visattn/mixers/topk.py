"""Top-k attention: each query keeps only its k largest scores.

Papers:
    - "Explicit Sparse Transformer: Concentrated Attention Through Explicit Selection", Zhao, Lin, Sun, Zhang,
      Ren, Sun, 2019, arXiv:1912.11637 (https://arxiv.org/abs/1912.11637): the scores ``P = QKᵀ/sqrt(d)`` below the
      k-th largest of their row are set to -inf before the softmax (the paper: k = 8).
    - "Memory-efficient Transformers via Top-k Attention", Gupta, Dar, Goodman, Ciprut, Berant, SustaiNLP 2021,
      arXiv:2106.06899 (https://arxiv.org/abs/2106.06899): the same top-k attention computed over chunks of
      queries, keeping only the k scores and the indices of each query (``chunk_size=``): O(c·N) transient and
      O(N·k) saved memory instead of O(N²).

Both give ``softmax`` over the k selected scores of every row (visible keys only; a row with fewer than k visible
keys keeps them all). Ties: the unchunked form keeps every score equal to the k-th largest (the rule of the
released Explicit Sparse code, ``scores < kth`` are masked), so a tie at the threshold keeps more than k keys; the
chunked form keeps exactly k (``torch.topk``'s choice among equal scores). On inputs without ties at the k-th
score (almost surely, for real-valued activations) the two are the same function.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_int
from ..registry import register
from ._base import TokenMixer
from ._sparse_utils import gather_rows, key_mask_of

__all__ = ['TopKAttention']


@register(
    'topk', paper='Explicit Sparse Transformer: Concentrated Attention Through Explicit Selection',
    arxiv='1912.11637', year=2019, family='sparse', complexity='O(N²)', kind='mixer', supports_causal=True,
)
class TopKAttention(TokenMixer):
    """Softmax attention restricted to the ``top_k`` largest scores of every query.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`).
        top_k: k, scores kept per query (1912.11637: 8).
        chunk_size: None (default): the explicit sparse form over the whole score matrix; an int: the memory-
            efficient form of 2106.06899 over chunks of this many queries.
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
            top_k: int = 8,
            chunk_size: int | None = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        self.top_k = check_int('top_k', top_k)
        self.chunk_size = None if chunk_size is None else check_int('chunk_size', chunk_size)
        self._chunk = 0 if chunk_size is None else chunk_size  # an int for TorchScript: 0 = unchunked

    def _scores(self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None, start: int,
                is_causal: bool) -> tuple[Tensor, Tensor | None]:
        """Scores (at least float32) of the queries ``start ..`` (``q: [B, H, c, D]``) against every key, and the
        visible pairs (None: every pair)."""
        s = torch.matmul(q * self.scale, k.transpose(-1, -2))
        s = s.to(torch.promote_types(s.dtype, torch.float32))
        ok: Tensor | None = None
        if key_padding_mask is not None:
            ok = key_mask_of(key_padding_mask, q).unsqueeze(-2)  # [B, 1, 1, N]
        if is_causal:
            rows = torch.arange(start, start + q.shape[-2], device=q.device)
            later = torch.arange(k.shape[-2], device=q.device)[None, :] <= rows[:, None]  # [c, N]
            ok = later if ok is None else ok & later
        return s, ok

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        masked = -1e30  # MASKED of _sparse_utils (TorchScript reads no module-level number)
        N = q.shape[-2]
        top = min(self.top_k, N)
        dropout_p = self.attn_drop.p if self.training else 0.
        if self._chunk == 0:
            s, ok = self._scores(q, k, key_padding_mask, 0, is_causal)
            if ok is not None:
                s = s.masked_fill(~ok, masked)  # a masked score: exp(MASKED - max) = 0 in any row that sees a key
            if top < N:  # keep the scores >= the k-th largest of the row (ties at it included)
                s = s.masked_fill(s < s.detach().topk(top, dim=-1).values[..., -1:], masked)
            p = torch.softmax(s, dim=-1)
            if ok is not None:
                p = p.masked_fill(~ok.any(-1, keepdim=True), 0.)  # a row that sees no key
            if dropout_p > 0.:
                p = F.dropout(p, dropout_p, True)
            return torch.matmul(p.to(v.dtype), v)
        parts: list[Tensor] = []
        for start in range(0, N, self._chunk):
            s, ok = self._scores(q[:, :, start:start + self._chunk], k, key_padding_mask, start, is_causal)
            if ok is not None:
                s = s.masked_fill(~ok, masked)
            values, index = s.topk(top, dim=-1)  # [B, H, c, k]
            p = torch.softmax(values, dim=-1)
            if ok is not None:
                p = p.masked_fill(values <= masked / 2, 0.)  # masked picks (a row with fewer than k keys, or none)
            if dropout_p > 0.:
                p = F.dropout(p, dropout_p, True)
            c = index.shape[-2]
            chosen = gather_rows(v, index.flatten(-2)).unflatten(-2, (c, top))  # [B, H, c, k, D]
            parts.append(torch.matmul(p.to(v.dtype).unsqueeze(-2), chosen).squeeze(-2))
        return torch.cat(parts, dim=2) if len(parts) else torch.zeros_like(v)
