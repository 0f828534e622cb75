"""Coordinate Attention (CA), and timm's simplified variant.

Paper: "Coordinate Attention for Efficient Mobile Network Design", Hou, Zhou, Feng, CVPR 2021, arXiv:2103.02907
(https://arxiv.org/abs/2103.02907). Released code: https://github.com/houqb/CoordAttention (``coordatt.py``).

Coordinate information embedding pools along each axis separately, ``z^h_c(h) = 1/W Σ_w x_c(h, w)`` ([B, C, H, 1])
and ``z^w_c(w) = 1/H Σ_h x_c(h, w)`` ([B, C, 1, W]). Coordinate attention generation concatenates the two along the
spatial axis and applies a shared 1×1 convolution ``F1`` (C → mip), batch norm and a non-linearity δ (h-swish):
``f = δ(BN(F1([z^h, z^w])))`` ([B, mip, H + W, 1]; the BN statistics run over both strips together, as in the code);
``f`` is split back into ``f^h`` and ``f^w``, and two 1×1 convolutions (mip → C) with a sigmoid give
``g^h = σ(F_h(f^h))``, ``g^w = σ(F_w(f^w))``. The output is ``y_c(i, j) = x_c(i, j) · g^h_c(i) · g^w_c(j)``.

Defaults follow the paper and its code: reduction r = 32 with ``mip = max(8, C / r)`` (the code writes ``C // r``;
``rd_divisor=1`` rounds C / r to the nearest integer instead, which gives the same width for every width of
MobileNetV2 and ResNet), convolutions with bias, h-swish. timm's ``CoordAttn`` computes the same function with another
width (``make_divisible(C / 16 · 2/3, 8)``) and convolutions without bias: ``rd_channels=`` and ``bias=False`` give
it, and its state dict loads as it is (same keys ``conv1``, ``bn1``, ``conv_h``, ``conv_w``). The released MobileNetV2
model (``mbv2_ca.py``) puts the block after the depthwise 3×3 convolution (with its BN and ReLU6) of every inverted
residual block that expands (t = 6), not in the first, non-expanding one: 3.95M parameters (the README's table).

``SimpleCoordAttn`` is timm's own simplification, no paper: it drops the batch norm (so the shared reduction ``fc1``,
a linear layer, may run on each strip alone), uses SiLU, and adds the two directional logits before one gate,
``y = x · σ(a^h_c(i) + a^w_c(j))``, instead of multiplying two gates.

Under autograd, ``x · g^h · g^w`` has a hand-written backward (``axis_gate``, also traced when compiled):
``dx = dy · g^w · g^h`` and the gate gradients as matrix-vector products of ``dy · x`` with the other gate, so no
product map is stored.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import (
    check_channels,
    check_float,
    check_int,
    check_nchw,
    get_act,
    is_compiling,
    make_divisible,
    mean_expanded_grad,
    needs_grad,
)
from ..registry import register


class _AxisGate(torch.autograd.Function):
    """``y = x · a_h · a_w`` for x [B, C, H, W], a_h [B, C, H, 1] and a_w [B, C, 1, W]."""

    @staticmethod
    def forward(ctx, x: Tensor, a_h: Tensor, a_w: Tensor) -> Tensor:
        ctx.save_for_backward(x, a_h, a_w)
        return (x * a_h).mul_(a_w)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, a_h, a_w = ctx.saved_tensors
        g_h, g_w = a_h.to(dy.dtype), a_w.to(dy.dtype)  # gates in the output's dtype (16-bit gates under autocast)
        dx = da_h = da_w = None
        if ctx.needs_input_grad[0]:
            dx = (dy * g_w).mul_(g_h).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            p = dy * x
            if ctx.needs_input_grad[1]:
                da_h = torch.matmul(p, g_w.transpose(-1, -2)).to(a_h.dtype)  # Σ_w p · a_w: [B, C, H, 1]
            if ctx.needs_input_grad[2]:
                da_w = torch.matmul(g_h.transpose(-1, -2), p).to(a_w.dtype)  # Σ_h a_h · p: [B, C, 1, W]
        return dx, da_h, da_w


def axis_gate(x: Tensor, a_h: Tensor, a_w: Tensor) -> Tensor:
    """``x · a_h · a_w`` for x [B, C, H, W], a row gate a_h [B, C, H, 1] and a column gate a_w [B, C, 1, W].

    Under autograd a hand-written backward that keeps no product map, also when compiled (``torch.compile`` traces
    it, so that compiled and eager gradients round alike: a deep network in training mode, MobileNetV2 with a block
    after each depthwise convolution, amplifies a mere reordering of the product far past 1e-5). Without autograd
    the second product runs in place (eager) or fuses (compiled); TorchScript takes the plain expression.
    """
    if not torch.jit.is_scripting():
        if needs_grad([x, a_h, a_w]):
            return _AxisGate.apply(x, a_h, a_w)
        if not is_compiling():
            return (x * a_h).mul_(a_w)
    return x * a_h * a_w


@register(
    'coord', paper='Coordinate Attention for Efficient Mobile Network Design', arxiv='2103.02907', year=2021,
    family='spatial', complexity='O(N·C)',
)
class CoordAttn(nn.Module):
    """Coordinate attention block.

    Args:
        channels: input and output channels C.
        rd_ratio: 1/r of the shared reduction (default 1/32, the paper's r = 32).
        rd_channels: width mip of the shared reduction; overrides ``rd_ratio`` and ``min_rd_channels`` when given.
        rd_divisor: round C / r to a multiple of this (default 1).
        min_rd_channels: the floor of mip (default 8, as the paper's ``max(8, C / r)``).
        bias: biases in the three 1×1 convolutions (default True, as the released code; timm: False).
        act_layer: the non-linearity δ after the batch norm (default h-swish).
        norm_layer: the norm after the shared reduction (default BatchNorm2d; None for none).
        gate_layer: the gate of each direction (default sigmoid).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
            self,
            channels: int,
            *,
            rd_ratio: float = 1 / 32,
            rd_channels: int | None = None,
            rd_divisor: int = 1,
            min_rd_channels: int = 8,
            bias: bool = True,
            act_layer: type[nn.Module] | str = nn.Hardswish,
            norm_layer: type[nn.Module] | None = nn.BatchNorm2d,
            gate_layer: type[nn.Module] | str = nn.Sigmoid,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        rd_ratio = check_float('rd_ratio', rd_ratio, 0., 1., low_open=True)
        check_int('rd_divisor', rd_divisor)
        check_int('min_rd_channels', min_rd_channels)
        if rd_channels is None:
            rd_channels = max(min_rd_channels, make_divisible(channels * rd_ratio, rd_divisor))
        self.rd_channels = check_int('rd_channels', rd_channels)
        self.conv1 = nn.Conv2d(channels, rd_channels, 1, bias=bias, **dd)
        self.bn1 = norm_layer(rd_channels, **dd) if norm_layer is not None else nn.Identity()
        self.act = get_act(act_layer)
        self.conv_h = nn.Conv2d(rd_channels, channels, 1, bias=bias, **dd)
        self.conv_w = nn.Conv2d(rd_channels, channels, 1, bias=bias, **dd)
        self.gate = get_act(gate_layer)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'CoordAttn')
        H, W = x.shape[2], x.shape[3]
        z_h = mean_expanded_grad(x, [3], keepdim=True)  # [B, C, H, 1]
        z_w = mean_expanded_grad(x, [2], keepdim=True).transpose(-1, -2)  # [B, C, W, 1]
        f = self.act(self.bn1(self.conv1(torch.cat([z_h, z_w], dim=2))))  # [B, mip, H + W, 1]
        f_h, f_w = torch.split(f, [H, W], dim=2)
        g_h = self.gate(self.conv_h(f_h))  # [B, C, H, 1]
        g_w = self.gate(self.conv_w(f_w)).transpose(-1, -2)  # [B, C, 1, W]
        return axis_gate(x, g_h, g_w)


@register(
    'scoord', paper='Coordinate Attention for Efficient Mobile Network Design', arxiv='2103.02907', year=2021,
    family='spatial', complexity='O(N·C)',
)
class SimpleCoordAttn(nn.Module):
    """timm's simplified coordinate attention: ``y = x · σ(W_h δ(W_1 z^h + b_1) + b_h + W_w δ(W_1 z^w + b_1) + b_w)``.

    Args:
        channels: input and output channels C.
        rd_ratio, se_factor: the reduction width is ``C · rd_ratio · se_factor`` (defaults 1/4 and 2/3, as timm) ...
        rd_divisor: ... rounded to a multiple of this (default 8).
        rd_channels: the reduction width; overrides the three above when given.
        bias: biases in the three linear layers (default True).
        act_layer: the activation after the shared reduction (default SiLU).
        gate_layer: the gate (default sigmoid).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
            self,
            channels: int,
            *,
            rd_ratio: float = 0.25,
            rd_channels: int | None = None,
            rd_divisor: int = 8,
            se_factor: float = 2 / 3,
            bias: bool = True,
            act_layer: type[nn.Module] | str = nn.SiLU,
            gate_layer: type[nn.Module] | str = nn.Sigmoid,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        rd_ratio = check_float('rd_ratio', rd_ratio, 0., 1., low_open=True)
        se_factor = check_float('se_factor', se_factor, 0., None, low_open=True)
        check_int('rd_divisor', rd_divisor)
        if rd_channels is None:
            rd_channels = make_divisible(channels * rd_ratio * se_factor, rd_divisor)
        self.rd_channels = check_int('rd_channels', rd_channels)
        self.fc1 = nn.Linear(channels, rd_channels, bias=bias, **dd)
        self.act = get_act(act_layer)
        self.fc_h = nn.Linear(rd_channels, channels, bias=bias, **dd)
        self.fc_w = nn.Linear(rd_channels, channels, bias=bias, **dd)
        self.gate = get_act(gate_layer)
        self.sigmoid_gate = isinstance(self.gate, nn.Sigmoid)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'SimpleCoordAttn')
        H = x.shape[2]
        z = torch.cat([mean_expanded_grad(x, [3]), mean_expanded_grad(x, [2])], dim=2)  # [B, C, H + W]
        f = self.act(self.fc1(z.transpose(1, 2)))  # [B, H + W, rd]: no norm, so both strips share one call
        a_h = self.fc_h(f[:, :H]).transpose(1, 2).unsqueeze(-1)  # [B, C, H, 1]
        a_w = self.fc_w(f[:, H:]).transpose(1, 2).unsqueeze(-2)  # [B, C, 1, W]
        s = a_h + a_w  # [B, C, H, W]
        if not torch.jit.is_scripting() and self.sigmoid_gate and not needs_grad([x, s]):
            return s.sigmoid_().mul_(x)  # inference: gated in place
        return x * self.gate(s)
