"""HaloNet blocked local self-attention.

Paper: "Scaling Local Self-Attention for Parameter Efficient Visual Backbones", Vaswani, Ramachandran,
Srinivas, Parmar, Hechtman, Shlens, CVPR 2021, arXiv:2103.12731 (https://arxiv.org/abs/2103.12731).

The image is split into non-overlapping b×b query blocks; every block attends to its (b + 2h)×(b + 2h) window,
the block grown by a halo of h pixels on each side. Multi-head, with 2-D relative position embeddings
factorised over height and width (the HaloNet/BoTNet form): for a query at ``(i, j)`` and a key at ``(a, b)``

    logit = (q^T k + q^T (r^h_{a-i} + r^w_{b-j})) / sqrt(d_qk)

``stride=2`` is the paper's attention downsampling: queries come from the subsampled block (every second pixel,
a (b/2)×(b/2) query block), keys and values from the full-resolution window, and the relative offsets are
measured in pixels of the input. Any H×W works: the input is zero-padded at the bottom/right to a multiple of b,
the halo is zero-padded too, and every padded key is masked out of the softmax (timm's ``HaloAttn`` needs
sizes divisible by b). The attention itself is ``visattn.ops.halo_attention_2d`` (Triton kernels on CUDA).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_channels, check_nchw, make_divisible
from ..ops import halo_attention_2d
from ..registry import register

__all__ = ['HaloAttn']


@register(
    'halo', paper='Scaling Local Self-Attention for Parameter Efficient Visual Backbones', arxiv='2103.12731',
    year=2021, family='local', complexity='O(N·(b+2h)²·C)', backends=('torch', 'triton'),
)
class HaloAttn(nn.Module):
    """Blocked local self-attention with halos.

    Args:
        channels: input channels C.
        out_channels: output (value) channels (default C); divisible by ``num_heads``.
        num_heads: attention heads (default 8).
        dim_head: query/key width per head (default ``out_channels * qk_ratio`` rounded to 8, over the heads).
        block_size: side b of the query blocks (default 8).
        halo_size: halo h around each block (default 3).
        stride: 1, or a divisor s of b for attention downsampling (queries from every s-th pixel).
        qk_ratio: query/key width relative to ``out_channels`` when ``dim_head`` is not given (default 1).
        qkv_bias: bias in the projections (default False).
        feat_size: accepted for timm's self-attention factories; unused (any H×W works).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, out_channels, ceil(H / stride), ceil(W / stride)].
    """

    def __init__(
            self,
            channels: int,
            out_channels: int | None = None,
            *,
            num_heads: int = 8,
            dim_head: int | None = None,
            block_size: int = 8,
            halo_size: int = 3,
            stride: int = 1,
            qk_ratio: float = 1.0,
            qkv_bias: bool = False,
            feat_size: tuple[int, int] | None = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.out_channels = check_channels(out_channels or channels, 'out_channels')
        self.num_heads = check_channels(num_heads, 'num_heads')
        self.block_size = check_channels(block_size, 'block_size')
        self.stride = check_channels(stride, 'stride')
        if halo_size < 0:
            raise ValueError(f'halo_size must be >= 0, got {halo_size}')
        if self.out_channels % num_heads:
            raise ValueError(f'out_channels={self.out_channels} must be divisible by num_heads={num_heads}')
        if block_size % stride:
            raise ValueError(f'stride={stride} must divide block_size={block_size} (queries subsample each block)')
        if dim_head is not None:
            check_channels(dim_head, 'dim_head')
        if qk_ratio <= 0:
            raise ValueError(f'qk_ratio must be > 0, got {qk_ratio}')
        self.halo_size = halo_size
        self.win_size = block_size + 2 * halo_size
        self.dim_head_qk = dim_head or make_divisible(self.out_channels * qk_ratio, 8) // num_heads
        self.dim_head_v = self.out_channels // num_heads
        self.scale = self.dim_head_qk ** -0.5
        self.q = nn.Conv2d(channels, num_heads * self.dim_head_qk, 1, stride=stride, bias=qkv_bias, **dd)
        self.kv = nn.Conv2d(channels, num_heads * (self.dim_head_qk + self.dim_head_v), 1, bias=qkv_bias, **dd)
        self.rel_height = nn.Parameter(torch.empty(2 * self.win_size - 1, self.dim_head_qk, **dd))
        self.rel_width = nn.Parameter(torch.empty(2 * self.win_size - 1, self.dim_head_qk, **dd))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fan-in normal projections, relative embeddings N(0, d_qk^-1)."""
        for conv in (self.q, self.kv):
            nn.init.normal_(conv.weight, std=self.channels ** -0.5)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        nn.init.normal_(self.rel_height, std=self.scale)
        nn.init.normal_(self.rel_width, std=self.scale)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, type(self).__name__)
        N, dq, dv = self.num_heads, self.dim_head_qk, self.dim_head_v
        # [B, N·D, H, W] -> [B, N, H, W, D]; q at every stride-th pixel: [B, N, ceil(H / s), ceil(W / s), d_qk]
        q = self.q(x).unflatten(1, (N, dq)).permute(0, 1, 3, 4, 2)
        k, v = self.kv(x).unflatten(1, (N, dq + dv)).permute(0, 1, 3, 4, 2).split([dq, dv], dim=-1)
        out = halo_attention_2d(q, k, v, block_size=self.block_size, halo_size=self.halo_size, stride=self.stride,
                                rel_h=self.rel_height.to(q.dtype), rel_w=self.rel_width.to(q.dtype), scale=self.scale)
        return out.permute(0, 1, 4, 2, 3).flatten(1, 2)
