"""Efficient attention.

Paper: "Efficient Attention: Attention with Linear Complexities", Shen, Zhang, Zhao, Yi, Li, WACV 2021,
arXiv:1812.01243 (https://arxiv.org/abs/1812.01243).

``E(Q, K, V) = ρ_q(Q) (ρ_k(K)ᵀ V)``: ρ_q is a softmax over each query's features, ρ_k a softmax over the N
positions of each key feature, and the [d_k, d_v] context ``ρ_k(K)ᵀ V`` is formed first, so that cost and memory
are linear in N = HW. Keys, queries and values are 1×1 convs; multi-head splits the channels; a 1×1 conv
reprojects to C and the result is added to the input, as the paper's module does. The default widths (C/2 for
keys and values) are those of the non-local block that the paper replaces with this module.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_channels, check_int, check_nchw, softmax_fp32
from ..registry import register

__all__ = ['EfficientAttention']


@register(
    'efficient', paper='Efficient Attention: Attention with Linear Complexities', arxiv='1812.01243', year=2018,
    family='context', complexity='O(N·C²)',
)
class EfficientAttention(nn.Module):
    """Efficient attention module with a residual connection.

    Args:
        channels: input and output channels C.
        key_channels: total width of keys and queries d_k (default C/2, at least ``num_heads``).
        value_channels: total width of values d_v (default C/2, at least ``num_heads``).
        num_heads: number of heads; must divide both widths (default 1).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
            self,
            channels: int,
            *,
            key_channels: int | None = None,
            value_channels: int | None = None,
            num_heads: int = 1,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.num_heads = check_int('num_heads', num_heads)
        self.key_channels = check_int('key_channels', max(num_heads, channels // 2) if key_channels is None
                                      else key_channels)
        self.value_channels = check_int('value_channels', max(num_heads, channels // 2) if value_channels is None
                                        else value_channels)
        for name, width in (('key_channels', self.key_channels), ('value_channels', self.value_channels)):
            if width % num_heads:
                raise ValueError(f'{name} ({width}) must be divisible by num_heads ({num_heads})')
        self.keys = nn.Conv2d(channels, self.key_channels, 1, **dd)
        self.queries = nn.Conv2d(channels, self.key_channels, 1, **dd)
        self.values = nn.Conv2d(channels, self.value_channels, 1, **dd)
        self.reprojection = nn.Conv2d(self.value_channels, channels, 1, **dd)

    def reset_parameters(self) -> None:
        """Default conv initialisation, as the released code."""
        for conv in (self.keys, self.queries, self.values, self.reprojection):
            conv.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'EfficientAttention')
        heads = self.num_heads
        B, _, H, W = x.shape
        dk, dv = self.key_channels // heads, self.value_channels // heads
        k = softmax_fp32(self.keys(x).reshape(B, heads, dk, H * W), dim=-1)  # [B, n, d, HW]: over positions
        q = softmax_fp32(self.queries(x).reshape(B, heads, dk, H * W), dim=-2)  # over features
        v = self.values(x).reshape(B, heads, dv, H * W)  # [B, n, e, HW]
        context = torch.matmul(k, v.transpose(-1, -2))  # [B, heads, d_k, d_v]
        out = torch.matmul(context.transpose(-1, -2), q)  # [B, heads, d_v, HW]
        out = out.reshape(B, self.value_channels, H, W)
        return x + self.reprojection(out)
