"""Global Context (GC) block.

Paper: "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond", Cao, Xu, Lin, Wei, Hu,
ICCV Workshops 2019, arXiv:1904.11492 (https://arxiv.org/abs/1904.11492).

Context modelling by attention pooling, ``c = Σ_j softmax_j(W_k x_j) x_j`` (one 1×1 conv to a single map,
softmax over all H·W positions); a bottleneck transform ``W_v2 ReLU(LN(W_v1 c))`` with reduction r = 16 and
layer norm over the reduced channels; fusion by broadcast addition ``y = x + transform(c)`` (the paper's
best), or by scaling ``y = x * σ(transform'(c))`` as an option. The last conv of each transform starts at
zero, as the released code initialises it, so that the block starts as the identity. Module names follow
timm's ``GlobalContext`` (``conv_attn``, ``mlp_add.fc1/norm/fc2``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_channels, check_nchw, get_act, mean_expanded_grad, reduced_channels, softmax_fp32
from ..registry import register


class _ContextTransform(nn.Module):
    """1×1 conv -> LayerNorm over channels -> act -> 1×1 conv on a [B, C, 1, 1] context vector."""

    def __init__(self, channels: int, rd_channels: int, act_layer, dd: dict) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, **dd)
        self.norm = nn.LayerNorm(rd_channels, **dd)
        self.act = get_act(act_layer, inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, **dd)

    def forward(self, c: Tensor) -> Tensor:
        h = self.norm(self.fc1(c).flatten(1)).unflatten(1, (-1, 1, 1))  # LN over the C/r channels
        return self.fc2(self.act(h))


@register(
    'gc', paper='GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond', arxiv='1904.11492',
    year=2019, family='context', complexity='O(N·C)',
)
class GlobalContext(nn.Module):
    """GC block.

    Args:
        channels: input and output channels C.
        rd_ratio, rd_channels, rd_divisor: bottleneck width of the transform (default C/16).
        pooling: ``'att'`` (attention pooling, default) or ``'avg'`` (global average pooling).
        fuse_add: fuse by broadcast addition (default True).
        fuse_scale: fuse by channel scaling with a sigmoid gate (default False).
        act_layer: activation of the transform (default ReLU).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
            self,
            channels: int,
            *,
            rd_ratio: float = 1 / 16,
            rd_channels: int | None = None,
            rd_divisor: int = 1,
            pooling: str = 'att',
            fuse_add: bool = True,
            fuse_scale: bool = False,
            act_layer: type[nn.Module] | str = nn.ReLU,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        if pooling not in ('att', 'avg'):
            raise ValueError(f"pooling must be 'att' or 'avg', got {pooling!r}")
        if not (fuse_add or fuse_scale):
            raise ValueError('at least one of fuse_add and fuse_scale must be True')
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.rd_channels = reduced_channels(channels, rd_ratio, rd_channels, rd_divisor)
        self.conv_attn = nn.Conv2d(channels, 1, 1, **dd) if pooling == 'att' else None
        self.mlp_add = _ContextTransform(channels, self.rd_channels, act_layer, dd) if fuse_add else None
        self.mlp_scale = _ContextTransform(channels, self.rd_channels, act_layer, dd) if fuse_scale else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming for the attention conv, zeros for the last conv of each transform (start as identity)."""
        if self.conv_attn is not None:
            nn.init.kaiming_normal_(self.conv_attn.weight, mode='fan_in', nonlinearity='relu')
            nn.init.zeros_(self.conv_attn.bias)
        for mlp in (self.mlp_add, self.mlp_scale):
            if mlp is not None:
                nn.init.zeros_(mlp.fc2.weight)
                nn.init.zeros_(mlp.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'GlobalContext')
        if self.conv_attn is not None:
            w = softmax_fp32(self.conv_attn(x).flatten(2), dim=-1)  # [B, 1, HW], softmax over positions
            context = torch.matmul(x.flatten(2), w.transpose(1, 2)).unsqueeze(-1)  # [B, C, 1, 1]
        else:
            context = mean_expanded_grad(x, [2, 3], keepdim=True)
        if self.mlp_scale is not None:
            x = x * self.mlp_scale(context).sigmoid()
        if self.mlp_add is not None:
            x = x + self.mlp_add(context)
        return x
