"""Bottleneck Attention Module (BAM).

Paper: "BAM: Bottleneck Attention Module", Park, Woo, Lee, Kweon, BMVC 2018, arXiv:1807.06514
(https://arxiv.org/abs/1807.06514).

A channel branch ``Mc(F) = MLP(AvgPool(F))`` (C → C/r → C, with batch norm after the hidden layer) and a
spatial branch ``Ms(F)`` (1×1 reduction to C/r, two 3×3 convolutions with dilation 4, 1×1 to one map, batch
norm and ReLU after each hidden conv), broadcast to C×H×W and combined.

The paper writes ``F' = F + F ⊗ σ(Mc(F) + Ms(F))``, i.e. ``F * (1 + σ(Mc + Ms))``: that is the default
(``combine='sum'``). The released code multiplies the branches instead, ``F * (1 + σ(Mc · Ms))``:
``combine='product'``. The layer layout follows the released code, which gives BAM-ResNet-50 (BAMs after
stages 1, 2 and 3, r = 16) its 25,915,099 parameters.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_channels, check_int, check_nchw, get_act, mean_expanded_grad, needs_grad, reduced_channels
from ..registry import register


def _conv_bn_act(cin: int, cout: int, kernel_size: int, dilation: int, act_layer, dd: dict) -> list[nn.Module]:
    pad = dilation * (kernel_size - 1) // 2
    return [
        nn.Conv2d(cin, cout, kernel_size, padding=pad, dilation=dilation, **dd),
        nn.BatchNorm2d(cout, **dd),
        get_act(act_layer, inplace=True),
    ]


@register(
    'bam', paper='BAM: Bottleneck Attention Module', arxiv='1807.06514', year=2018, family='spatial',
    complexity='O(N·C²/r²)',
)
class BottleneckAttnModule(nn.Module):
    """BAM block.

    Args:
        channels: input and output channels C.
        rd_ratio, rd_channels, rd_divisor: reduced width C/r of both branches (default r = 16).
        dilation: dilation of the spatial branch's 3×3 convolutions, >= 1 (default 4).
        num_dilated_convs: number of dilated 3×3 convolutions, >= 0 (default 2).
        combine: ``'sum'`` (the paper, default) or ``'product'`` (the released code) of the two branches.
        act_layer: hidden activation (default ReLU).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W]. In training mode the channel branch's batch norm needs B >= 2.
    """

    def __init__(
            self,
            channels: int,
            *,
            rd_ratio: float = 1 / 16,
            rd_channels: int | None = None,
            rd_divisor: int = 1,
            dilation: int = 4,
            num_dilated_convs: int = 2,
            combine: str = 'sum',
            act_layer: type[nn.Module] | str = nn.ReLU,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        if combine not in ('sum', 'product'):
            raise ValueError(f"combine must be 'sum' (paper) or 'product' (released code), got {combine!r}")
        check_int('dilation', dilation)
        check_int('num_dilated_convs', num_dilated_convs, 0)
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.combine = combine
        rd = self.rd_channels = reduced_channels(channels, rd_ratio, rd_channels, rd_divisor)
        self.channel_att = nn.Sequential(
            *_conv_bn_act(channels, rd, 1, 1, act_layer, dd),
            nn.Conv2d(rd, channels, 1, **dd),
        )
        dilated = [m for _ in range(num_dilated_convs) for m in _conv_bn_act(rd, rd, 3, dilation, act_layer, dd)]
        self.spatial_att = nn.Sequential(
            *_conv_bn_act(channels, rd, 1, 1, act_layer, dd),
            *dilated,
            nn.Conv2d(rd, 1, 1, **dd),
        )

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'BottleneckAttnModule')
        if self.training and x.shape[0] < 2:
            raise ValueError(
                'BottleneckAttnModule: the channel branch normalises over the batch (BatchNorm) and needs a batch '
                f'of at least 2 in training mode, got shape {list(x.shape)}; use eval() for a single image')
        mc = self.channel_att(mean_expanded_grad(x, [2, 3], keepdim=True))  # [B, C, 1, 1]
        ms = self.spatial_att(x)  # [B, 1, H, W]
        att = mc + ms if self.combine == 'sum' else mc * ms  # [B, C, H, W]
        if needs_grad([x, att]):
            return torch.addcmul(x, x, att.sigmoid())  # x * (1 + σ(att))
        return att.sigmoid_().mul_(x).add_(x)
