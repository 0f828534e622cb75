"""Softmax attention: the full baseline, multi-query and grouped-query attention.

- ``full``: scaled dot-product attention, "Attention Is All You Need", Vaswani et al., NeurIPS 2017,
  arXiv:1706.03762, through ``torch.nn.functional.scaled_dot_product_attention``. Its state dict is that of
  timm's ``Attention`` (``qkv``, ``proj``, optional ``q_norm`` / ``k_norm`` / ``norm``) and, given the same
  weights, so is its output.
- ``mqa``: multi-query attention, "Fast Transformer Decoding: One Write-Head is All You Need", Shazeer 2019,
  arXiv:1911.02150: every query head attends over one shared key head and one shared value head.
- ``gqa``: grouped-query attention, "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
  Checkpoints", Ainslie et al. 2023, arXiv:2305.13245: ``num_kv_heads`` key/value heads, each shared by a group
  of ``num_heads / num_kv_heads`` query heads (``num_kv_heads=1`` is MQA, ``num_kv_heads=num_heads`` is MHA).
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from .._utils import check_int
from ..registry import register
from ._base import TokenMixer, softmax_attention

__all__ = ['FullAttention', 'GroupedQueryAttention', 'MultiQueryAttention']


@register(
    'full', paper='Attention Is All You Need', arxiv='1706.03762', year=2017, family='softmax',
    complexity='O(N²·C)', kind='mixer', supports_causal=True,
)
class FullAttention(TokenMixer):
    """Multi-head softmax attention ``softmax(q kᵀ / √D + mask) v`` (timm's ``Attention``, with masks).

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer, device,
            dtype: as `TokenMixer` (timm's ``Attention``).

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask`` [B, N] bool (True = real token) or broadcastable to
        [B, H, N, N] (SDPA's convention).
    """

    supports_key_padding = True
    supports_dense_mask = True
    supports_causal = True

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        p = self.attn_drop.p if self.training else 0.
        return softmax_attention(q, k, v, key_padding_mask, attn_mask, is_causal, dropout_p=p, scale=self.scale)


@register(
    'gqa', paper='GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints',
    arxiv='2305.13245', year=2023, family='softmax', complexity='O(N²·C)', kind='mixer', supports_causal=True,
)
class GroupedQueryAttention(FullAttention):
    """Grouped-query attention: ``num_kv_heads`` key/value heads, each shared by ``num_heads / num_kv_heads``
    query heads.

    The fused ``qkv`` projection outputs ``(num_heads + 2 · num_kv_heads) · D`` features (queries, then keys,
    then values), so only a multi-head checkpoint with ``num_kv_heads == num_heads`` loads into it unchanged.

    Args:
        dim, num_heads, ...: as `TokenMixer`.
        num_kv_heads: key/value heads G; ``num_heads`` must be divisible by it (default 1: multi-query).

    Shapes:
        x: [B, N, C] -> [B, N, C].
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
            num_kv_heads: int = 1,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            use_qkv=False, device=device, dtype=dtype)
        if num_heads % check_int('num_kv_heads', num_kv_heads):
            raise ValueError(
                f'num_kv_heads must be a positive int dividing num_heads={num_heads}, got {num_kv_heads!r}')
        self.num_kv_heads = num_kv_heads
        self.qkv = nn.Linear(
            dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=qkv_bias, device=device, dtype=dtype)

    def split_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, N, C] -> q [B, H, N, D], k and v [B, H, N, D]`` (each key/value head repeated over its group)."""
        B, N, _ = x.shape
        H, G, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(x).reshape(B, N, H + 2 * G, D).transpose(1, 2)  # [B, H + 2G, N, D]
        q, k, v = qkv.split((H, G, G), dim=1)
        k, v = (t.repeat_interleave(H // G, dim=1) for t in (k, v))
        return self.q_norm(q), self.k_norm(k), v


@register(
    'mqa', paper='Fast Transformer Decoding: One Write-Head is All You Need', arxiv='1911.02150', year=2019,
    family='softmax', complexity='O(N²·C)', kind='mixer', supports_causal=True,
)
class MultiQueryAttention(GroupedQueryAttention):
    """Multi-query attention: every query head attends over one shared key head and value head
    (`GroupedQueryAttention` with ``num_kv_heads=1``).

    Shapes:
        x: [B, N, C] -> [B, N, C].
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
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            num_kv_heads=1, device=device, dtype=dtype)
