"""Split attention (Splat), the convolution of ResNeSt.

Paper: "ResNeSt: Split-Attention Networks", Zhang, Wu, Zhang, Zhu, Lin, Zhang, Sun, He, Mueller, Manmatha, Li,
Smola, arXiv:2004.08955, 2020 (https://arxiv.org/abs/2004.08955). Released code:
https://github.com/zhanghang1989/ResNeSt (``SplAtConv2d`` in ``resnest/torch/models/splat.py``).

With cardinality K (``groups``) and radix R, one grouped k×k convolution (K·R groups) maps the input to R·C
channels, followed by BN and ReLU; its output splits into R maps ``U_r`` [B, C, H', W'] (split r is channels
r·C … (r+1)·C - 1; split r of cardinal group k is convolution group r·K + k). The splits are summed and pooled,
``s = GAP(Σ_r U_r)`` (computed as ``Σ_r GAP(U_r)``: no summed map); a grouped (K groups) dense layer with BN and
ReLU reduces it, ``z = ReLU(BN(W_1 s + b_1))``, and a second one (K groups) gives R·C logits ``W_2 z + b_2``. The
r-softmax normalises them across the radix within each channel: the logits of cardinal group k are laid out as
[R, C/K] (the released ``rSoftMax``: ``view(B, K, R, C/K).transpose(1, 2)``), ``a_r = softmax_r(·)``, and with
R = 1 a sigmoid takes its place. The output is ``V = Σ_r a_r · U_r`` (``V = a · U`` with R = 1).

Defaults and names follow timm's ``SplitAttn`` (its state dict loads as it is: ``conv``, ``bn0``, ``fc1``, ``bn1``,
``fc2``), which follows the released code: R = 2, K = 1, width of ``fc1`` ``max(32, C_in·R/4)`` (``rd_ratio=1/4``,
rounded to a multiple of ``rd_divisor=8`` as timm), biases in ``fc1`` and ``fc2``, none in the convolution. Two
differences, both defaults: batch norm (``bn0``, ``bn1``) is on, as in the paper and in ResNeSt (timm's module
leaves ``norm_layer=None`` to its caller); and the padding is ``dilation · (k - 1) / 2``, so that a dilated
convolution keeps the size (timm's default padding is ``k // 2`` whatever the dilation; its ResNeSt passes
``padding=dilation``). ``rd_channels`` has timm's meaning: the width per radix split, so ``fc1`` has
``rd_channels·R`` outputs. In ResNeSt the block replaces the 3×3 convolution of every bottleneck; with ``stride``
it downsamples, as timm's ``SplitAttn`` (ResNeSt itself strides with a 3×3 average pool after it, ``avd``).
Under autograd, ``V = Σ_r a_r U_r`` reuses SK's hand-written backward (no product map is stored).
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
    check_odd,
    get_act,
    is_compiling,
    make_divisible,
    mean_expanded_grad,
    needs_grad,
    softmax_fp32,
)
from ..registry import register
from .sk import _mix, branch_mix


def splat_rd_channels(channels: int, radix: int, rd_ratio: float, rd_divisor: int, min_channels: int = 32) -> int:
    """Width of ``fc1`` as timm's ``SplitAttn``: ``C_in·R·rd_ratio`` rounded to a multiple of ``rd_divisor`` (not
    more than 10% down), at least ``min_channels``."""
    return make_divisible(channels * radix * rd_ratio, rd_divisor, min_channels, round_limit=0.9)


@register(
    'splat', paper='ResNeSt: Split-Attention Networks', arxiv='2004.08955', year=2020, family='channel',
    complexity='O(N·C²·k²/G)',
)
class SplitAttn(nn.Module):
    """Split-attention convolution.

    Args:
        channels: input channels C_in.
        out_channels: output channels C (default C_in).
        kernel_size: odd size k of the grouped convolution (default 3).
        stride: its stride (default 1); the output is then ceil(H/stride) × ceil(W/stride).
        dilation: its dilation (default 1); the padding keeps the size.
        groups: the cardinality K (default 1); K·R must divide C_in, and K must divide C and the width of ``fc1``.
        radix: R, the number of splits (default 2); 1 gates with a sigmoid.
        rd_ratio: width of ``fc1`` as a fraction of C_in·R (default 1/4), at least 32 ...
        rd_channels: ... or ``rd_channels·R`` when given (timm's meaning) ...
        rd_divisor: ... rounded to a multiple of this (default 8).
        bias: bias in the grouped convolution (default False).
        act_layer: activation after ``bn0`` and ``bn1`` (default ReLU).
        norm_layer: norm after the convolution and after ``fc1`` (default BatchNorm2d; None for none, as timm's
            default).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C_in, H, W] -> [B, C, H', W']. In training mode ``bn1`` (on pooled vectors) needs B >= 2.
    """

    def __init__(
            self,
            channels: int,
            out_channels: int | None = None,
            *,
            kernel_size: int = 3,
            stride: int = 1,
            dilation: int = 1,
            groups: int = 1,
            radix: int = 2,
            rd_ratio: float = 0.25,
            rd_channels: int | None = None,
            rd_divisor: int = 8,
            bias: bool = False,
            act_layer: type[nn.Module] | str = nn.ReLU,
            norm_layer: type[nn.Module] | None = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        out_channels = self.out_channels = check_channels(out_channels or channels, 'out_channels')
        check_odd('kernel_size', kernel_size)
        check_int('stride', stride)
        check_int('dilation', dilation)
        check_int('groups', groups)
        self.radix = check_int('radix', radix)
        rd_ratio = check_float('rd_ratio', rd_ratio, 0., None, low_open=True)
        check_int('rd_divisor', rd_divisor)
        if rd_channels is None:
            attn = splat_rd_channels(channels, radix, rd_ratio, rd_divisor)
        else:
            attn = check_int('rd_channels', rd_channels) * radix
        self.rd_channels = attn
        if channels % (groups * radix):
            raise ValueError(f'groups·radix = {groups}·{radix} must divide channels={channels}; pass groups= or radix=')
        if out_channels % groups or attn % groups:
            raise ValueError(f'groups={groups} must divide out_channels={out_channels} and the attention width '
                             f'{attn}; pass groups=')
        self.groups = groups
        mid = out_channels * radix
        self.conv = nn.Conv2d(
            channels, mid, kernel_size, stride=stride, padding=dilation * (kernel_size - 1) // 2, dilation=dilation,
            groups=groups * radix, bias=bias, **dd)
        self.bn0 = norm_layer(mid, **dd) if norm_layer is not None else nn.Identity()
        self.act0 = get_act(act_layer, inplace=True)
        self.fc1 = nn.Conv2d(out_channels, attn, 1, groups=groups, **dd)
        self.bn1 = norm_layer(attn, **dd) if norm_layer is not None else nn.Identity()
        self.act1 = get_act(act_layer, inplace=True)
        self.fc2 = nn.Conv2d(attn, mid, 1, groups=groups, **dd)
        self.pooled_norm = norm_layer is not None

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'SplitAttn')
        B = x.shape[0]
        if self.training and self.pooled_norm and B < 2:
            raise ValueError(
                'SplitAttn: the attention layer normalises pooled vectors over the batch (BatchNorm) and needs a '
                f'batch of at least 2 in training mode, got shape {list(x.shape)}; use eval() for a single image')
        u = self.act0(self.bn0(self.conv(x)))  # [B, R·C, H', W']
        R, C = self.radix, self.out_channels
        s = mean_expanded_grad(u, [2, 3], keepdim=True)  # [B, R·C, 1, 1]
        if R > 1:
            s = s.view(B, R, C, 1, 1).sum(1)  # GAP(Σ_r U_r) = Σ_r GAP(U_r): no summed map
        logits = self.fc2(self.act1(self.bn1(self.fc1(s))))  # [B, R·C, 1, 1], cardinal group k: [R, C/K]
        if R == 1:
            a = torch.sigmoid(logits)
            if not torch.jit.is_scripting() and not needs_grad([u, a]):
                return u.mul_(a)  # inference: the convolution's output is ours to overwrite
            return u * a
        a = logits.view(B, self.groups, R, C // self.groups).transpose(1, 2)  # [B, R, K, C/K]
        a = softmax_fp32(a, dim=1).to(u.dtype).reshape(B, R, C, 1, 1)
        splits = list(u.chunk(R, dim=1))  # R × [B, C, H', W'] views
        if not torch.jit.is_scripting() and not is_compiling():
            return branch_mix(a, splits)  # V = Σ a_r U_r, with a backward that forms no product map
        return _mix(a, splits)
