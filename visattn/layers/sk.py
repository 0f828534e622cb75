"""Selective Kernel (SK) convolution.

Paper: "Selective Kernel Networks", Li, Wang, Hu, Yang, CVPR 2019, arXiv:1903.06586
(https://arxiv.org/abs/1903.06586).

Split: M branches of grouped 3×3 convolutions with dilation 1, 2, ... (the paper replaces the 5×5 kernel of
the second branch by a 3×3 with dilation 2), each followed by BN and ReLU. Fuse: ``s = GAP(Σ U_m)``,
``z = δ(BN(W s))`` with width ``d = max(C/r, L)``. Select: ``a_m = softmax_m(A_m z)`` per channel, and
``V = Σ a_m U_m``. The paper's SK[M=2, G=32, r=16] with L = 32 are the defaults. The unit replaces the 3×3
convolution of a bottleneck and takes its ``stride``. Under autograd, ``V = Σ a_m U_m`` has a hand-written
backward: ``dU_m = dV·a_m``, and ``da_m = Σ_hw dV·U_m`` as one reduction per branch, with no product map.
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
    mean_expanded_grad,
    reduced_channels,
    softmax_fp32,
)
from ..registry import register


def _mix(a: Tensor, u: list[Tensor]) -> Tensor:
    out = u[0] * a[:, 0]
    for m in range(1, len(u)):
        out.addcmul_(u[m], a[:, m])  # accumulated in place
    return out


class _BranchMix(torch.autograd.Function):
    """``V = Σ_m a_m U_m`` for branch maps ``U_m`` [B, C, H, W] and per-channel weights ``a`` [B, M, C, 1, 1]."""

    @staticmethod
    def forward(ctx, a: Tensor, *u: Tensor) -> Tensor:
        ctx.save_for_backward(a, *u)
        return _mix(a, list(u))

    @staticmethod
    def backward(ctx, dv: Tensor):
        a, *u = ctx.saved_tensors
        dvf = dv.flatten(2)
        da = torch.stack([torch.linalg.vecdot(dvf, um.flatten(2)) for um in u], 1) if ctx.needs_input_grad[0] \
            else None
        du = [dv * a[:, m] if ctx.needs_input_grad[m + 1] else None for m in range(len(u))]
        return (None if da is None else da.view_as(a).to(a.dtype), *du)


def branch_mix(a: Tensor, u: list[Tensor]) -> Tensor:
    """``Σ_m a[:, m] · u[m]`` (``_BranchMix`` where autograd records it)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (a, *u)):
        return _BranchMix.apply(a, *u)
    return _mix(a, u)


@register(
    'sk', paper='Selective Kernel Networks', arxiv='1903.06586', year=2019, family='channel',
    complexity='O(N·C²·M/G)',
)
class SelectiveKernel(nn.Module):
    """SK unit.

    Args:
        channels: input channels C.
        out_channels: output channels (default C).
        stride: stride of every branch (default 1); the output is then ceil(H/stride) × ceil(W/stride).
        num_branches: M, the number of branches (default 2).
        kernel_size: kernel of every branch, odd (default 3); branch m has dilation m + 1 unless ``dilations``.
        dilations: explicit dilation per branch.
        groups: G, the groups of the branch convolutions (default 32); must divide both channel counts.
        rd_ratio, rd_channels, rd_divisor: width C/r of the fuse layer (default r = 16) ...
        min_rd_channels: ... but at least L (default 32; 0 for no floor).
        act_layer, norm_layer: activation (ReLU) and norm (BatchNorm2d).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, out_channels, H', W']. In training mode the fuse layer's BN needs B >= 2.
    """

    def __init__(
            self,
            channels: int,
            out_channels: int | None = None,
            *,
            stride: int = 1,
            num_branches: int = 2,
            kernel_size: int = 3,
            dilations: tuple[int, ...] | None = None,
            groups: int = 32,
            rd_ratio: float = 1 / 16,
            rd_channels: int | None = None,
            rd_divisor: int = 1,
            min_rd_channels: int = 32,
            act_layer: type[nn.Module] | str = nn.ReLU,
            norm_layer: type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        out_channels = self.out_channels = check_channels(out_channels or channels, 'out_channels')
        check_int('stride', stride)
        check_int('num_branches', num_branches)
        check_odd('kernel_size', kernel_size)
        check_int('groups', groups)
        check_int('min_rd_channels', min_rd_channels, 0)
        dilations = tuple(dilations) if dilations is not None else tuple(range(1, num_branches + 1))
        if len(dilations) != num_branches:
            raise ValueError(f'dilations must have num_branches={num_branches} entries, got {dilations}')
        for d in dilations:
            check_int('dilations', d)
        if channels % groups or out_channels % groups:
            raise ValueError(
                f'groups={groups} must divide channels={channels} and out_channels={out_channels}; pass groups=')
        self.num_branches = num_branches
        self.branches = nn.ModuleList([
            nn.Sequential(
                nn.Conv2d(
                    channels, out_channels, kernel_size, stride=stride, padding=d * (kernel_size - 1) // 2,
                    dilation=d, groups=groups, bias=False, **dd),
                norm_layer(out_channels, **dd),
                get_act(act_layer, inplace=True),
            )
            for d in dilations
        ])
        rd = self.rd_channels = max(reduced_channels(out_channels, rd_ratio, rd_channels, rd_divisor), min_rd_channels)
        self.fc_reduce = nn.Conv2d(out_channels, rd, 1, bias=False, **dd)
        self.bn = norm_layer(rd, **dd)
        self.act = get_act(act_layer, inplace=True)
        self.fc_select = nn.Conv2d(rd, out_channels * num_branches, 1, bias=False, **dd)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'SelectiveKernel')
        if self.training and x.shape[0] < 2:
            raise ValueError(
                'SelectiveKernel: the fuse layer normalises over the batch (BatchNorm) and needs a batch of '
                f'at least 2 in training mode, got shape {list(x.shape)}; use eval() for a single image')
        u = [branch(x) for branch in self.branches]  # M × [B, C, H', W']
        s = mean_expanded_grad(u[0], [2, 3], keepdim=True)  # GAP(Σ U_m) = Σ GAP(U_m): no full-size sum
        for f in u[1:]:
            s = s + mean_expanded_grad(f, [2, 3], keepdim=True)
        z = self.act(self.bn(self.fc_reduce(s)))  # [B, d, 1, 1]
        a = softmax_fp32(self.fc_select(z).view(x.shape[0], self.num_branches, self.out_channels, 1, 1), dim=1)
        a = a.to(u[0].dtype)
        if not torch.jit.is_scripting() and not is_compiling():
            return branch_mix(a, u)  # V = Σ a_m U_m, with a backward that forms no product map
        return _mix(a, u)
