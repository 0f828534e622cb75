"""Convolutional Block Attention Module (CBAM).

Paper: "CBAM: Convolutional Block Attention Module", Woo, Park, Lee, Kweon, ECCV 2018, arXiv:1807.06521
(https://arxiv.org/abs/1807.06521).

Channel attention first, ``Mc(F) = σ(MLP(AvgPool(F)) + MLP(MaxPool(F)))`` with one MLP (reduction r = 16,
biases, ReLU) shared by the two pooled vectors; then spatial attention on the refined map,
``Ms(F') = σ(BN(f7×7([AvgPool_c(F'); MaxPool_c(F')])))``: a 7×7 convolution (no bias, then batch norm, as
the released code) over the channel-wise mean and max, in the paper's order [mean, max]. With r = 16 this
gives CBAM-ResNet-50 its 28,089,624 parameters. Module names follow timm's ``CbamModule``.

``lcbam`` is timm's "light" CBAM (``LightCbamModule``, an experiment of timm's, not in the paper): each gate
averages its two pooled statistics before one pass through its transform, ``Mc = σ(MLP((AvgPool(F) +
MaxPool(F)) / 2))`` and ``Ms = σ(BN(f7×7((AvgPool_c(F') + MaxPool_c(F')) / 2)))`` (a 1 → 1 channel conv), so
the MLP runs once and the spatial conv reads one map instead of two.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import (
    check_channels,
    check_nchw,
    check_odd,
    fused_act_name,
    get_act,
    is_compiling,
    mean_expanded_grad,
    needs_grad,
    reduced_channels,
)
from ..ops import channel_gate
from ..ops._dispatch import resolve_backend
from ..ops.channel_gate import gate_vector
from ..registry import register


class ChannelGate(nn.Module):
    """CBAM's channel attention: a shared MLP over average- and max-pooled vectors, summed, then a gate.

    Args:
        channels: channels C.
        rd_ratio, rd_channels, rd_divisor: the MLP's bottleneck width (default C/16).
        bias: biases in the MLP (default True, as the paper's and the released code's ``nn.Linear``).
        act_layer, gate_layer: hidden activation (ReLU) and gate (sigmoid).

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
        self.rd_channels = reduced_channels(channels, rd_ratio, rd_channels, rd_divisor)
        self.fc1 = nn.Conv2d(channels, self.rd_channels, 1, bias=bias, **dd)
        self.act = get_act(act_layer, inplace=True)
        self.fc2 = nn.Conv2d(self.rd_channels, channels, 1, bias=bias, **dd)
        self.gate = get_act(gate_layer)
        self.fused_act = fused_act_name(self.act, self.gate)

    def forward(self, x: Tensor, inplace: bool = False) -> Tensor:
        """``inplace=True`` lets the gate overwrite ``x`` when autograd does not need it (inference on the PyTorch
        path, where a fresh output costs a full allocation and write)."""
        if not torch.jit.is_scripting() and not is_compiling() and self.fused_act is not None:
            return self._forward_fused(x, inplace)
        pooled = torch.cat([mean_expanded_grad(x, [2, 3], keepdim=True), x.amax((2, 3), keepdim=True)])  # [2B, C, 1, 1]
        avg, mx = self.fc2(self.act(self.fc1(pooled))).chunk(2)
        return x * self.gate(avg + mx)


    @torch.jit.unused
    def _forward_fused(self, x: Tensor, inplace: bool) -> Tensor:
        """The fused op: Triton on a GPU, the same math in PyTorch elsewhere (compiled and scripted: plain path)."""
        weights = (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        present = [t for t in (x, *weights) if t is not None]
        if inplace and not needs_grad(present) and resolve_backend('auto', x, op='channel_gate') == 'torch':
            gate = gate_vector(x, 'avgmax', 'mlp', self.fused_act, *weights)[0]
            return x.mul_(gate[:, :, None, None])  # float32 gate, rounded once into x's dtype
        return channel_gate(x, *weights, pool='avgmax', act=self.fused_act)

class SpatialGate(nn.Module):
    """CBAM's spatial attention: a k×k conv (+ BN) over the channel-wise [mean, max], then a gate.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    num_maps = 2  # the channel-pooled maps the conv reads (`pool`)

    def __init__(
            self,
            kernel_size: int = 7,
            *,
            gate_layer: type[nn.Module] | str = nn.Sigmoid,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        check_odd('kernel_size', kernel_size)
        dd = dict(device=device, dtype=dtype)
        self.conv = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(self.num_maps, 1, kernel_size, padding=kernel_size // 2, bias=False, **dd),
            bn=nn.BatchNorm2d(1, **dd),
        ))
        self.gate = get_act(gate_layer)

    def pool(self, x: Tensor) -> Tensor:
        """The channel-wise [mean, max] of ``x``: [B, 2, H, W]."""
        return torch.cat([mean_expanded_grad(x, [1], keepdim=True), x.amax(1, keepdim=True)], dim=1)

    def gate_map(self, x: Tensor) -> Tensor:
        """The spatial gate [B, 1, H, W] of ``x``."""
        return self.gate(self.conv(self.pool(x)))

    def forward(self, x: Tensor, inplace: bool = False) -> Tensor:
        """``inplace=True`` lets the gate overwrite ``x`` when autograd does not need it (inference)."""
        gate = self.gate_map(x)
        return x.mul_(gate) if inplace and not needs_grad([x, gate]) else x * gate

    def forward_add(self, x: Tensor, shortcut: Tensor) -> Tensor:
        """``self(x) + shortcut`` in one pass (a fused multiply-add); overwrites ``x`` where autograd does not
        need it."""
        gate = self.gate_map(x)
        if needs_grad([x, gate, shortcut]):
            return torch.addcmul(shortcut, x, gate)
        return torch.addcmul(shortcut, x, gate, out=x)


@register(
    'cbam', paper='CBAM: Convolutional Block Attention Module', arxiv='1807.06521', year=2018, family='spatial',
    complexity='O(N·C)', backends=('torch', 'triton'),
)
class Cbam(nn.Module):
    """CBAM: channel gate, then spatial gate.

    Args:
        channels: input and output channels C.
        rd_ratio, rd_channels, rd_divisor: width of the channel MLP (default C/16).
        mlp_bias: biases in the channel MLP (default True).
        spatial_kernel_size: size of the spatial convolution, odd (default 7).
        act_layer, gate_layer: hidden activation (ReLU) and gate (sigmoid).
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
            mlp_bias: bool = True,
            spatial_kernel_size: int = 7,
            act_layer: type[nn.Module] | str = nn.ReLU,
            gate_layer: type[nn.Module] | str = nn.Sigmoid,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        check_odd('spatial_kernel_size', spatial_kernel_size)
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        channel_gate, spatial_gate = self.gate_classes()
        self.channel = channel_gate(
            channels, rd_ratio=rd_ratio, rd_channels=rd_channels, rd_divisor=rd_divisor, bias=mlp_bias,
            act_layer=act_layer, gate_layer=gate_layer, **dd)
        self.spatial = spatial_gate(spatial_kernel_size, gate_layer=gate_layer, **dd)

    @staticmethod
    def gate_classes() -> tuple[type[nn.Module], type[nn.Module]]:
        """The channel and spatial gate classes."""
        return ChannelGate, SpatialGate

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'Cbam')
        return self.spatial(self.channel(x), inplace=True)  # the channel gate's output is ours to overwrite

    def forward_add(self, x: Tensor, shortcut: Tensor) -> Tensor:
        """``self(x) + shortcut`` with the residual addition fused into the spatial gate's product (one pass over
        the map fewer). Where autograd does not need them, both gates overwrite ``x``: pass a temporary (a
        residual branch's output), as a residual block does."""
        check_nchw(x, self.channels, 'Cbam')
        return self.spatial.forward_add(self.channel(x, inplace=True), shortcut)


class LightChannelGate(ChannelGate):
    """timm's light channel gate: ``σ(MLP((AvgPool(x) + MaxPool(x)) / 2))``, one pass through the MLP.

    Args and shapes as `ChannelGate`.
    """

    def forward(self, x: Tensor, inplace: bool = False) -> Tensor:
        """``inplace=True`` lets the gate overwrite ``x`` when autograd does not need it (inference)."""
        ct = torch.promote_types(x.dtype, torch.float32)
        avg = x.sum([2, 3], keepdim=True, dtype=ct) / (x.shape[2] * x.shape[3])  # backward: a broadcast view
        pooled = (0.5 * (avg + x.amax((2, 3), keepdim=True))).to(x.dtype)  # [B, C, 1, 1]
        gate = self.gate(self.fc2(self.act(self.fc1(pooled))))
        return x.mul_(gate) if inplace and not needs_grad([x, gate]) else x * gate


class LightSpatialGate(SpatialGate):
    """timm's light spatial gate: a k×k conv (+ BN) over the channel-wise ``(mean + max) / 2``, then a gate.

    Args and shapes as `SpatialGate`.
    """

    num_maps = 1

    def pool(self, x: Tensor) -> Tensor:
        """The channel-wise ``(mean + max) / 2`` of ``x``: [B, 1, H, W] (the mean summed in at least float32)."""
        ct = torch.promote_types(x.dtype, torch.float32)
        avg = x.sum([1], keepdim=True, dtype=ct) / x.shape[1]
        return (0.5 * (avg + x.amax(1, keepdim=True))).to(x.dtype)


@register(
    'lcbam', paper='CBAM: Convolutional Block Attention Module', arxiv='1807.06521', year=2018, family='spatial',
    complexity='O(N·C)',
)
class LightCbam(Cbam):
    """Light CBAM (timm's ``LightCbamModule``): the light channel gate, then the light spatial gate.

    Args:
        channels: input and output channels C.
        rd_ratio, rd_channels, rd_divisor: width of the channel MLP (default C/16).
        mlp_bias: biases in the channel MLP (default True, as `Cbam`; timm's default is False).
        spatial_kernel_size: size of the spatial convolution, odd (default 7).
        act_layer, gate_layer: hidden activation (ReLU) and the gate of both branches (sigmoid; timm's module
            always uses the sigmoid).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    @staticmethod
    def gate_classes() -> tuple[type[nn.Module], type[nn.Module]]:
        return LightChannelGate, LightSpatialGate

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'LightCbam')
        return self.spatial(self.channel(x), inplace=True)  # the channel gate's output is ours to overwrite

    def forward_add(self, x: Tensor, shortcut: Tensor) -> Tensor:
        """``self(x) + shortcut`` with the addition fused into the spatial gate's product, as `Cbam.forward_add`:
        where autograd does not need them, both gates overwrite ``x`` (pass a temporary)."""
        check_nchw(x, self.channels, 'LightCbam')
        return self.spatial.forward_add(self.channel(x, inplace=True), shortcut)
