"""Squeeze-and-Excitation (SE) channel attention.

Paper: "Squeeze-and-Excitation Networks", Hu, Shen, Albanie, Sun, Wu, CVPR 2018, arXiv:1709.01507
(https://arxiv.org/abs/1709.01507).

``y = x * σ(W2 δ(W1 GAP(x) + b1) + b2)``: global average pooling squeezes each channel to a scalar, a
two-layer bottleneck MLP (reduction ``r = 16``, ReLU) excites, and a sigmoid gate rescales the channels.
Parameter names follow timm's ``SEModule`` (``fc1``, ``fc2``), so timm's SE-ResNet weights load as they are.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import (
    check_channels,
    check_nchw,
    fused_act_name,
    get_act,
    is_compiling,
    mean_expanded_grad,
    reduced_channels,
)
from ..ops import channel_gate
from ..registry import register


@register(
    'se', paper='Squeeze-and-Excitation Networks', arxiv='1709.01507', year=2017, family='channel',
    complexity='O(N·C)', backends=('torch', 'triton'),
)
class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation block.

    Args:
        channels: input and output channels C.
        rd_ratio: reduction ratio 1/r of the bottleneck (default 1/16, the paper's r = 16).
        rd_channels: bottleneck width; overrides ``rd_ratio`` when given.
        rd_divisor: round the bottleneck width to a multiple of this (default 1: exactly C/r, as the paper).
        bias: biases in the two fully connected layers (default True, as the paper).
        act_layer: activation between the layers (default ReLU).
        gate_layer: gating activation (default sigmoid).
        device, dtype: factory arguments passed to every parameter.

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
            bias: bool = True,
            act_layer: type[nn.Module] | str = nn.ReLU,
            gate_layer: type[nn.Module] | str = nn.Sigmoid,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.rd_channels = reduced_channels(channels, rd_ratio, rd_channels, rd_divisor)
        self.fc1 = nn.Conv2d(channels, self.rd_channels, kernel_size=1, bias=bias, **dd)
        self.act = get_act(act_layer, inplace=True)
        self.fc2 = nn.Conv2d(self.rd_channels, channels, kernel_size=1, bias=bias, **dd)
        self.gate = get_act(gate_layer)
        self.fused_act = fused_act_name(self.act, self.gate)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'SqueezeExcite')
        if not torch.jit.is_scripting() and not is_compiling() and self.fused_act is not None:
            # the fused op: Triton on a GPU, the same math in PyTorch elsewhere (compiled and scripted: plain path)
            return channel_gate(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, act=self.fused_act)
        s = mean_expanded_grad(x, [2, 3], keepdim=True)  # [B, C, 1, 1]
        return x * self.gate(self.fc2(self.act(self.fc1(s))))
