"""Pyramid Split Attention (PSA), the unit of EPSANet.

Paper: "EPSANet: An Efficient Pyramid Squeeze Attention Block on Convolutional Neural Network", Zhang, Zu, Lu, Zou,
Meng, ACCV 2022, arXiv:2105.14447 (https://arxiv.org/abs/2105.14447; v1 titled "... Pyramid Split Attention ...").
Released code: https://github.com/murufeng/EPSANet (``models/epsanet.py``, ``PSAModule``).

PSA replaces the 3×3 convolution of a ResNet bottleneck and maps C input channels to C_out with a stride. S branches
(S = 4) of grouped convolutions with growing kernels extract multi-scale maps of C_out/S channels each (the SPC
module), an SE weight module shared by the branches scores each map's channels, a softmax across the S branches
recalibrates the scores, and the maps are reweighted and concatenated:

    F_i = Conv(k_i × k_i, G_i)(X)                   i = 0 .. S−1, each [C_out/S, H', W']
    Z_i = SEWeight(F_i) = σ(W2 δ(W1 GAP(F_i) + b1) + b2)
    att_i = exp(Z_i) / Σ_j exp(Z_j)                 (per channel, across the branches)
    Out = Cat([F_0 ⊙ att_0, ..., F_{S−1} ⊙ att_{S−1}])

Defaults follow the released code: kernels (3, 5, 7, 9) with groups (1, 4, 8, 16), padding k // 2, no conv bias,
the SE module with reduction 16, biases and ReLU, one SE module for all branches. As in the released code, every
branch convolves the whole input (the paper's text speaks of splitting the input into S parts; its parameter counts,
22.56M for EPSANet-50, are those of whole-input branches, and the authors answer "follow the code", issue #9):
``split_input=True`` gives each branch its own C/S input channels instead. The released code concatenates the
reweighted maps in reverse order (``Cat([Y_3, Y_2, Y_1, Y_0])``), a fixed permutation of the output channels that the
bottleneck's next batch norm and 1×1 convolution absorb; the paper's order is the default, ``reverse_concat=True``
gives the code's (for its checkpoints). The SE width is ``C_out/S · 1/16`` rounded (the code's ``// 16``: the same
for every width of EPSANet).

The maps are concatenated once and reweighted in one product; under autograd the product has a hand-written
backward that forms no product map (the weights' gradient is one reduction ``Σ_hw dY·F``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import (
    check_channels,
    check_int,
    check_nchw,
    check_odd,
    get_act,
    is_compiling,
    needs_grad,
    reduced_channels,
    softmax_fp32,
)
from ..registry import register


class _ChannelScale(torch.autograd.Function):
    """``y = u · a`` for a map u [B, C, H, W] and per-channel weights a [B, C, 1, 1]."""

    @staticmethod
    def forward(ctx, u: Tensor, a: Tensor) -> Tensor:
        ctx.save_for_backward(u, a)
        return u * a

    @staticmethod
    def backward(ctx, dy: Tensor):
        u, a = ctx.saved_tensors
        du = dy * a if ctx.needs_input_grad[0] else None
        da = None
        if ctx.needs_input_grad[1]:
            da = torch.linalg.vecdot(dy.flatten(2), u.flatten(2)).view_as(a)
        return du, da


def channel_scale(u: Tensor, a: Tensor) -> Tensor:
    """``u · a`` (u [B, C, H, W], a [B, C, 1, 1]): a backward without a product map under autograd; in place on
    ``u`` (a temporary of the caller) without it; the plain product when scripted or compiled."""
    if not torch.jit.is_scripting() and not is_compiling():
        if needs_grad([u, a]):
            return _ChannelScale.apply(u, a)
        return u.mul_(a)
    return u * a


class SEWeight(nn.Module):
    """EPSANet's SE weight module: the sigmoid weights ``σ(fc2(δ(fc1(GAP(F)))))`` of a map's channels, without the
    product (pooled input [N, C, 1, 1] -> weights [N, C, 1, 1])."""

    def __init__(self, channels: int, rd_channels: int, act_layer, gate_layer, dd: dict) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, **dd)
        self.act = get_act(act_layer, inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, **dd)
        self.gate = get_act(gate_layer)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.gate(self.fc2(self.act(self.fc1(pooled))))


@register(
    'psa', paper='EPSANet: An Efficient Pyramid Squeeze Attention Block on Convolutional Neural Network',
    arxiv='2105.14447', year=2021, family='channel', complexity='O(N·C²·Σk²/(S·G))',
)
class PyramidSplitAttn(nn.Module):
    """PSA unit (the 3×3 convolution of an EPSANet bottleneck).

    Args:
        channels: input channels C.
        out_channels: output channels C_out (default C); must be divisible by S.
        stride: stride of every branch (default 1); the output is then ceil(H/stride) × ceil(W/stride).
        kernel_sizes: the odd kernel k_i of each branch; S = their number (default (3, 5, 7, 9)).
        groups: the groups G_i of each branch's convolution (default (1, 4, 8, 16)); G_i must divide the branch's
            input channels (C, or C/S with ``split_input``) and C_out/S.
        split_input: branch i convolves the i-th of S channel slices of the input instead of the whole input
            (default False, as the released code).
        reverse_concat: concatenate the branches in reverse order, as the released code (default False: the paper's).
        rd_ratio, rd_channels, rd_divisor: width of the SE module, on C_out/S channels (default 1/16).
        act_layer, gate_layer: the SE module's activation (ReLU) and gate (sigmoid), before the softmax.
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C_out, H', W'].
    """

    def __init__(
            self,
            channels: int,
            out_channels: int | None = None,
            *,
            stride: int = 1,
            kernel_sizes: tuple[int, ...] = (3, 5, 7, 9),
            groups: tuple[int, ...] = (1, 4, 8, 16),
            split_input: bool = False,
            reverse_concat: bool = False,
            rd_ratio: float = 1 / 16,
            rd_channels: int | None = None,
            rd_divisor: int = 1,
            act_layer: type[nn.Module] | str = nn.ReLU,
            gate_layer: type[nn.Module] | str = nn.Sigmoid,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        out_channels = self.out_channels = check_channels(channels if out_channels is None else out_channels,
                                                          'out_channels')
        self.stride = check_int('stride', stride)
        kernel_sizes, groups = tuple(kernel_sizes), tuple(groups)
        if not kernel_sizes:
            raise ValueError('kernel_sizes must name at least one branch, got ()')
        for k in kernel_sizes:
            check_odd('kernel_sizes', k)
        if len(groups) != len(kernel_sizes):
            raise ValueError(f'groups must have one entry per branch (kernel_sizes={kernel_sizes}), got {groups}')
        for g in groups:
            check_int('groups', g)
        s = self.num_branches = len(kernel_sizes)
        if out_channels % s:
            raise ValueError(f'out_channels must be divisible by the number of branches S={s}, got {out_channels}')
        if split_input and channels % s:
            raise ValueError(f'split_input needs channels divisible by the number of branches S={s}, got {channels}')
        cin = channels // s if split_input else channels
        cb = self.branch_channels = out_channels // s
        for k, g in zip(kernel_sizes, groups):
            if cin % g or cb % g:
                raise ValueError(f'groups: {g} (kernel {k}) must divide the branch input channels {cin} and output '
                                 f'channels out_channels/S = {cb}; got groups={groups}')
        self.kernel_sizes, self.groups = kernel_sizes, groups
        self.split_input, self.reverse_concat = bool(split_input), bool(reverse_concat)
        self.convs = nn.ModuleList([
            nn.Conv2d(cin, cb, k, stride=stride, padding=k // 2, groups=g, bias=False, **dd)
            for k, g in zip(kernel_sizes, groups)
        ])
        self.rd_channels = reduced_channels(cb, rd_ratio, rd_channels, rd_divisor)
        self.se = SEWeight(cb, self.rd_channels, act_layer, gate_layer, dd)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'PyramidSplitAttn')
        s = self.num_branches
        inputs = x.chunk(s, 1) if self.split_input else [x] * s
        feats: list[Tensor] = []
        for i, conv in enumerate(self.convs):
            feats.append(conv(inputs[i]))  # [B, C_out/S, H', W']
        if self.reverse_concat:
            feats = feats[::-1]
        u = torch.cat(feats, 1)  # [B, C_out, H', W']
        B, _, H, W = u.shape
        ct = torch.promote_types(u.dtype, torch.float32)
        pooled = (u.sum([2, 3], dtype=ct) / (H * W)).to(u.dtype)  # [B, C_out]
        z = self.se(pooled.view(B * s, self.branch_channels, 1, 1))  # one SE pass for all branches
        att = softmax_fp32(z.view(B, s, self.branch_channels), dim=1)  # across the branches
        return channel_scale(u, att.reshape(B, self.out_channels, 1, 1).to(u.dtype))
