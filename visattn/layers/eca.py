"""Efficient Channel Attention (ECA).

Paper: "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks", Wang, Wu, Zhu, Li,
Zuo, Hu, CVPR 2020, arXiv:1910.03151 (https://arxiv.org/abs/1910.03151).

Global average pooling, then a 1-D convolution across channels without bias (local cross-channel
interaction, no dimensionality reduction), then a sigmoid gate. The kernel size adapts to the width:
``k = ψ(C) = |log2(C)/γ + b/γ|_odd`` with γ = 2, b = 1, where ``|t|_odd`` is taken, as in the released
code, as ``int(t)`` bumped to the next odd number (C = 64 → 3, 256/512/1024 → 5, 2048 → 7). The released
ImageNet checkpoints of ECA-ResNet-50 used k = 3, 5, 5, 7 per stage instead: pass ``kernel_size`` for that.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_channels, check_float, check_nchw, check_odd, get_act, is_compiling, mean_expanded_grad
from ..ops import eca_gate
from ..registry import register


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """The paper's adaptive kernel size ``|log2(C)/γ + b/γ|_odd`` (at least 3)."""
    t = int(abs((math.log2(channels) + beta) / gamma))
    return max(t if t % 2 else t + 1, 3)


@register(
    'eca', paper='ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks', arxiv='1910.03151',
    year=2020, family='channel', complexity='O(N·C)', backends=('torch', 'triton'),
)
class EfficientChannelAttn(nn.Module):
    """ECA block.

    Args:
        channels: input and output channels C.
        kernel_size: size k of the 1-D convolution across channels; None (default) adapts it to C.
        gamma, beta: the constants γ = 2 (> 0) and b = 1 (any finite number) of the adaptive kernel size.
        gate_layer: gating activation (default sigmoid).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
            self,
            channels: int,
            *,
            kernel_size: int | None = None,
            gamma: float = 2,
            beta: float = 1,
            gate_layer: type[nn.Module] | str = nn.Sigmoid,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        self.channels = check_channels(channels)
        gamma = check_float('gamma', gamma, 0., None, low_open=True)
        beta = check_float('beta', beta, -float('inf'), float('inf'), low_open=True, high_open=True)
        if kernel_size is None:
            kernel_size = eca_kernel_size(channels, gamma, beta)
        self.kernel_size = check_odd('kernel_size', kernel_size)
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False, device=device, dtype=dtype)
        self.gate = get_act(gate_layer)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'EfficientChannelAttn')
        if not torch.jit.is_scripting() and not is_compiling() and isinstance(self.gate, nn.Sigmoid):
            # the fused op: Triton on a GPU, the same math in PyTorch elsewhere (compiled and scripted: plain path)
            return eca_gate(x, self.conv.weight)
        s = self.conv(mean_expanded_grad(x, [2, 3]).unsqueeze(1))  # [B, 1, C]: channels as the sequence
        return x * self.gate(s).view(x.shape[0], -1, 1, 1)
