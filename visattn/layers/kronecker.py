"""Kronecker attention (KAO).

Paper: "Kronecker Attention Networks", Gao, Wang, Ji, KDD 2020, arXiv:2007.08442
(https://arxiv.org/abs/2007.08442).

Instead of flattening X ∈ R^{H×W×C} into H·W tokens, the Kronecker attention operators work on its two average
matrices, the row averages ``R_i = 1/W Σ_j X_ij`` (H vectors) and the column averages ``L_j = 1/H Σ_i X_ij``
(W vectors), juxtaposed as ``M = [R; L]`` (H + W vectors of C channels). With the paper's attention operator
``O = V softmax(Kᵀ Q)`` (no scaling of the scores):

- KAO_KV (``mode='kv'``): the queries are the H·W positions of X, the keys and values are M: each position attends
  to the H + W averages, O has H·W columns. Cost O(H·W·(H + W)·C).
- KAO_QKV (``mode='qkv'``, the default): queries, keys and values are all M; the output's H + W columns split into
  a row part O_R (H) and a column part O_L (W), and the map is rebuilt by the outer sum
  ``Y_ij = O_R,i + O_L,j`` (``combine='sum'``, the paper), or the outer product ``O_R,i ⊙ O_L,j``
  (``combine='product'``). Cost O(H·W·C + (H + W)²·C): the cheapest of the operators, the one the paper builds its
  networks from.

Here Q, K and V come from 1×1 convs (of X, or of M, which is the same as averaging their outputs: a 1×1 conv commutes
with the averages), the queries and keys to C_k = C channels by default, split over ``num_heads``; the output goes
through a 1×1 conv and a batch norm whose scale starts at 0, and is added to the input, ``z = x + BN(W_o Y)``, so that
the block starts as the identity (the non-local block's residual form; the paper leaves the module around the operator
to each network). For the outer sum the output conv is applied to the H + W vectors before the sum (the same function,
W·(H + W) instead of W·H·W work). The attention runs in ``scaled_dot_product_attention`` (``scale=1``, the paper; or
``scaled=True`` for 1/sqrt(d)).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_channels, check_int, check_nchw, mean_expanded_grad, reduced_channels
from ..registry import register

__all__ = ['KroneckerAttn']

_MODES = ('qkv', 'kv')
_COMBINE = ('sum', 'product')


@register(
    'kronecker', paper='Kronecker Attention Networks', arxiv='2007.08442', year=2020, family='context',
    complexity='O(N·C+(H+W)²·C)',
)
class KroneckerAttn(nn.Module):
    """Kronecker attention operator (KAO_QKV or KAO_KV) in a residual block.

    Args:
        channels: input and output channels C.
        mode: ``'qkv'`` (KAO_QKV, default) or ``'kv'`` (KAO_KV: every position queries the averages).
        combine: how KAO_QKV rebuilds the map from its row and column outputs: ``'sum'`` (outer sum, the paper) or
            ``'product'`` (outer product).
        num_heads: attention heads (default 1, the paper's single operator).
        rd_ratio, rd_channels, rd_divisor: width C_k of the queries and keys (default C).
        scaled: divide the scores by sqrt(C_k / heads) (default False: the paper does not scale).
        norm_layer: the norm after the output conv, its scale starting at 0 (default BatchNorm2d); ``None`` zeroes the
            output conv instead.
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
            self,
            channels: int,
            *,
            mode: str = 'qkv',
            combine: str = 'sum',
            num_heads: int = 1,
            rd_ratio: float = 1.0,
            rd_channels: int | None = None,
            rd_divisor: int = 1,
            scaled: bool = False,
            norm_layer: type[nn.Module] | None = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        if mode not in _MODES:
            raise ValueError(f'mode must be one of {_MODES}, got {mode!r}')
        if combine not in _COMBINE:
            raise ValueError(f'combine must be one of {_COMBINE}, got {combine!r}')
        self.mode, self.combine = mode, combine
        self.num_heads = check_int('num_heads', num_heads)
        self.rd_channels = reduced_channels(channels, rd_ratio, rd_channels, rd_divisor)
        for name, width in (('rd_channels', self.rd_channels), ('channels', channels)):
            if width % num_heads:
                raise ValueError(f'{name}={width} must be divisible by num_heads, got num_heads={num_heads}')
        self.scale = (self.rd_channels // num_heads) ** -0.5 if scaled else 1.0
        self.query = nn.Conv2d(channels, self.rd_channels, 1, **dd)
        self.key = nn.Conv2d(channels, self.rd_channels, 1, **dd)
        self.value = nn.Conv2d(channels, channels, 1, **dd)
        self.out = nn.Conv2d(channels, channels, 1, bias=norm_layer is None, **dd)
        self.norm = norm_layer(channels, **dd) if norm_layer is not None else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default conv initialisation; zero scale of the output norm (or a zero output conv): identity at start."""
        for conv in (self.query, self.key, self.value, self.out):
            conv.reset_parameters()
        if isinstance(self.norm, nn.Identity):
            nn.init.zeros_(self.out.weight)
            if self.out.bias is not None:
                nn.init.zeros_(self.out.bias)
        else:
            nn.init.zeros_(self.norm.weight)
            nn.init.zeros_(self.norm.bias)

    def _heads(self, t: Tensor) -> Tensor:
        """[B, c, L, 1] or [B, c, H, W] -> [B, heads, positions, c / heads]."""
        b, c, h, w = t.shape
        return t.reshape(b, self.num_heads, c // self.num_heads, h * w).transpose(2, 3)

    def kao(self, x: Tensor) -> Tensor:
        """The operator's output Y before the output conv: [B, C, H, W] (for the outer sum, already through the
        output conv, whose linear part commutes with the sum)."""
        b, c, h, w = x.shape
        rows = mean_expanded_grad(x, [3])  # R: [B, C, H]
        cols = mean_expanded_grad(x, [2])  # L: [B, C, W]
        m = torch.cat([rows, cols], dim=-1).unsqueeze(-1)  # M = [R; L]: [B, C, H + W, 1]
        k, v = self._heads(self.key(m)), self._heads(self.value(m))
        q = self._heads(self.query(x if self.mode == 'kv' else m))
        o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # [B, heads, H·W or H + W, C / heads]
        o = o.transpose(2, 3).reshape(b, c, o.shape[2])
        if self.mode == 'kv':
            return self.out(o.view(b, c, h, w))
        if self.combine == 'sum':
            o = F.conv2d(o.unsqueeze(-1), self.out.weight).squeeze(-1)  # W_o on the H + W vectors, bias added once
            y = o[:, :, :h].unsqueeze(-1) + o[:, :, h:].unsqueeze(-2)
            bias = self.out.bias
            if bias is not None:
                y = y + bias.view(1, -1, 1, 1)
            return y
        return self.out(o[:, :, :h].unsqueeze(-1) * o[:, :, h:].unsqueeze(-2))

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'KroneckerAttn')
        return x + self.norm(self.kao(x))

