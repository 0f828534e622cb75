"""Pooling token mixer (PoolFormer).

Paper: "MetaFormer Is Actually What You Need for Vision", Yu, Luo, Zhou, Si, Zhou, Wang, Feng, Yan, CVPR 2022,
arXiv:2111.11418 (https://arxiv.org/abs/2111.11418).

PoolFormer's token mixer, in place of attention in a MetaFormer block: average pooling over a K × K
neighbourhood (stride 1, padding K // 2), counting only the pixels inside the map at the borders
(``count_include_pad=False``), minus the input (the block's residual adds the input back),

    y[c, i, j] = (1 / |N(i, j)|) Σ_{(p, q) ∈ N(i, j)} x[c, p, q] - x[c, i, j],

with N(i, j) the pixels of the K × K window around (i, j) inside the map; ``pool_size`` K = 3 (the paper's and
timm's ``Pooling`` default; odd, so the window is centred). No parameters. This is timm's
``timm.models.metaformer.Pooling`` (the same function, tested to float64 precision); the subtraction here writes
into the pooled map instead of a new tensor, so one map fewer is allocated.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_channels, check_nchw, check_odd
from ..registry import register

__all__ = ['PoolMixer', 'pool_mix']


def pool_mix(x: Tensor, pool_size: int = 3) -> Tensor:
    """``avgpool_K(x) - x`` over the last two dims of ``x`` [B, C, H, W] (stride 1, borders averaged over the
    pixels inside the map)."""
    y = F.avg_pool2d(x, pool_size, 1, pool_size // 2, count_include_pad=False)
    return y.sub_(x)  # in place: avg_pool2d's backward does not need its output


@register(
    'poolformer', paper='MetaFormer Is Actually What You Need for Vision', arxiv='2111.11418', year=2022,
    family='token-mixing', complexity='O(N·C·K²)',
)
class PoolMixer(nn.Module):
    """PoolFormer's pooling mixer, ``avgpool(x) - x``.

    Args:
        channels: input and output channels C.
        pool_size: odd size K of the pooling window (default 3).
        device, dtype: factory arguments (the block has no parameters).

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W], any H and W.
    """

    def __init__(self, channels: int, *, pool_size: int = 3, device=None, dtype=None) -> None:
        super().__init__()
        self.channels = check_channels(channels)
        self.pool_size = check_odd('pool_size', pool_size)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'PoolMixer')
        return pool_mix(x, self.pool_size)
