"""Efficient Channel Attention (ECA).

Paper: "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks", Wang, Wu, Zhu, Li,
Zuo, Hu, CVPR 2020, arXiv:1910.03151 (https://arxiv.org/abs/1910.03151).

Global average pooling, then a 1-D convolution across channels without bias (local cross-channel
interaction, no dimensionality reduction), then a sigmoid gate. The kernel size adapts to the width:
``k = ψ(C) = |log2(C)/γ + b/γ|_odd`` with γ = 2, b = 1, where ``|t|_odd`` is taken, as in the released
code, as ``int(t)`` bumped to the next odd number (C = 64 → 3, 256/512/1024 → 5, 2048 → 7). The released
ImageNet checkpoints of ECA-ResNet-50 used k = 3, 5, 5, 7 per stage instead: pass ``kernel_size`` for that.

Two variants from timm's ``timm/layers/eca.py``, with the same adaptive kernel size (not in the paper):

- ``ecam`` (``EcaModule(use_mlp=True)``, a timm experiment): the 1-D convolution becomes a small MLP across
  channels, ``h_c = δ(w1 s_c + b1) ∈ R^{C_r}`` (a 1×1 Conv1d 1 → C_r with bias, ReLU), then
  ``z = Conv1d_k(h) + b2`` (C_r → 1, kernel k, zero padding (k-1)/2, with bias), ``y = x ⊙ σ(z)``;
  C_r = C/8 rounded to a multiple of 8 (timm's defaults ``rd_ratio=1/8``, ``rd_divisor=8``, and its rounding,
  which adds one divisor where rounding down lost more than 10%).
- ``ceca`` (``CecaModule``, by Chris Ha for timm): ECA's convolution with circular instead of zero padding
  across channels, ``z_c = Σ_t w_t s_{(c + t - (k-1)/2) mod C}``, so that the first and last channels interact
  too; no bias, as ECA.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import (
    check_channels,
    check_float,
    check_nchw,
    check_odd,
    get_act,
    is_compiling,
    mean_expanded_grad,
    reduced_channels,
)
from ..ops import eca_gate
from ..registry import register


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """The paper's adaptive kernel size ``|log2(C)/γ + b/γ|_odd`` (at least 3)."""
    t = int(abs((math.log2(channels) + beta) / gamma))
    return max(t if t % 2 else t + 1, 3)


def _checked_kernel_size(channels: int, kernel_size: int | None, gamma: float, beta: float) -> int:
    """The kernel size of an ECA block: ``kernel_size`` if given, else the adaptive one; checked (odd, >= 1)."""
    gamma = check_float('gamma', gamma, 0., None, low_open=True)
    beta = check_float('beta', beta, -float('inf'), float('inf'), low_open=True, high_open=True)
    if kernel_size is None:
        kernel_size = eca_kernel_size(channels, gamma, beta)
    return check_odd('kernel_size', kernel_size)


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
        self.kernel_size = kernel_size = _checked_kernel_size(channels, kernel_size, gamma, beta)
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False, device=device, dtype=dtype)
        self.gate = get_act(gate_layer)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'EfficientChannelAttn')
        if not torch.jit.is_scripting() and not is_compiling() and isinstance(self.gate, nn.Sigmoid):
            # the fused op: Triton on a GPU, the same math in PyTorch elsewhere (compiled and scripted: plain path)
            return eca_gate(x, self.conv.weight)
        s = self.conv(mean_expanded_grad(x, [2, 3]).unsqueeze(1))  # [B, 1, C]: channels as the sequence
        return x * self.gate(s).view(x.shape[0], -1, 1, 1)


def _pooled(x: Tensor) -> Tensor:
    """Global average pooling [B, C, H, W] -> [B, 1, C] (summed in at least float32; backward: a broadcast view),
    in ``x``'s dtype: the channels as the sequence of a 1-D convolution."""
    s = x.sum([2, 3], dtype=torch.promote_types(x.dtype, torch.float32)) / (x.shape[2] * x.shape[3])
    return s.to(x.dtype).unsqueeze(1)


@register(
    'ecam', paper='ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks', arxiv='1910.03151',
    year=2020, family='channel', complexity='O(N·C)',
)
class EfficientChannelAttnMlp(nn.Module):
    """ECA with an MLP across channels in place of the 1-D convolution (timm's ``EcaModule(use_mlp=True)``).

    Args:
        channels: input and output channels C.
        kernel_size: size k of the second (1-D) convolution across channels; None (default) adapts it to C.
        gamma, beta: the constants γ = 2 (> 0) and b = 1 of the adaptive kernel size.
        rd_ratio, rd_channels, rd_divisor: hidden width C_r of the MLP (default C/8, a multiple of 8, as timm).
        act_layer: hidden activation (default ReLU).
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
            rd_ratio: float = 1 / 8,
            rd_channels: int | None = None,
            rd_divisor: int = 8,
            act_layer: type[nn.Module] | str = nn.ReLU,
            gate_layer: type[nn.Module] | str = nn.Sigmoid,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.kernel_size = kernel_size = _checked_kernel_size(channels, kernel_size, gamma, beta)
        # timm's rounding: never more than 10% below C·rd_ratio
        self.rd_channels = rd = reduced_channels(channels, rd_ratio, rd_channels, rd_divisor, round_limit=0.9)
        self.conv = nn.Conv1d(1, rd, 1, **dd)
        self.act = get_act(act_layer, inplace=True)
        self.conv2 = nn.Conv1d(rd, 1, kernel_size, padding=(kernel_size - 1) // 2, **dd)
        self.gate = get_act(gate_layer)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'EfficientChannelAttnMlp')
        z = self.conv2(self.act(self.conv(_pooled(x))))  # [B, C_r, C] hidden, then [B, 1, C]
        return x * self.gate(z)[:, 0, :, None, None]


@register(
    'ceca', paper='ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks', arxiv='1910.03151',
    year=2020, family='channel', complexity='O(N·C)',
)
class CircularEfficientChannelAttn(nn.Module):
    """ECA with circular padding across channels (timm's ``CecaModule``).

    Args:
        channels: input and output channels C.
        kernel_size: size k of the 1-D convolution across channels, odd and at most 2C + 1 (the circular padding
            wraps once); None (default) adapts it to C.
        gamma, beta: the constants γ = 2 (> 0) and b = 1 of the adaptive kernel size.
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
        self.kernel_size = kernel_size = _checked_kernel_size(channels, kernel_size, gamma, beta)
        self.padding = (kernel_size - 1) // 2
        if self.padding > channels:
            raise ValueError(f'kernel_size must be at most 2 * channels + 1 = {2 * channels + 1} for the circular '
                             f'padding across {channels} channels, got {kernel_size}')
        self.conv = nn.Conv1d(1, 1, kernel_size, bias=False, device=device, dtype=dtype)
        self.gate = get_act(gate_layer)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'CircularEfficientChannelAttn')
        s = F.pad(_pooled(x), [self.padding, self.padding], mode='circular')  # [B, 1, C + k - 1]
        return x * self.gate(self.conv(s))[:, 0, :, None, None]
