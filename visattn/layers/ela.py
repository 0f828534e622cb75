"""Efficient Local Attention (ELA).

Paper: "ELA: Efficient Local Attention for Deep Convolutional Neural Networks", Xu, Wan, arXiv:2403.01123, 2024
(https://arxiv.org/abs/2403.01123). Released code: https://github.com/Xuwei86/ELA_Code (``MbV2/models``).

Strip pooling along each axis, ``z^h_c(h) = 1/W Σ_w x_c(h, w)`` ([B, C, H]) and ``z^w_c(w) = 1/H Σ_h x_c(h, w)``
([B, C, W]), then, without channel reduction, a 1-D convolution F along the strip, group norm G_n and a sigmoid:
``y^h = σ(G_n(F(z^h)))``, ``y^w = σ(G_n(F(z^w)))``, and ``Y = x · y^h · y^w`` (a row gate times a column gate).
In the released code one convolution and one group norm serve both strips (``shared=True``, the default).

The paper's three hyper-parameters give four versions (``variant``): the kernel size of F, its groups, and the
number of groups of G_n:

    ELA-T: k = 5, groups = C (depthwise), G_n with 32 groups
    ELA-B: k = 7, groups = C (depthwise), G_n with 16 groups   (the default)
    ELA-S: k = 5, groups = C / 8,          G_n with 16 groups
    ELA-L: k = 7, groups = C / 8,          G_n with 16 groups

The paper meant T and B for light networks, B and S for deeper ones, L for large ones; ``kernel_size``, ``groups``
and ``norm_groups`` override the variant's values. The released MobileNetV2 (``mbv2_ela72.py``, ELA-L's settings)
puts the block where coordinate attention goes: after the depthwise convolution of every expanding block.

timm's ``EfficientLocalAttn`` departs from the paper in three ways: separate convolutions and norms for the two strips
(``conv_h``/``conv_w`` as (k, 1)/(1, k) depthwise Conv2d, ``norm_h``/``norm_w``), group norm with one group, and a
SiLU between the norm and the sigmoid. ``shared=False, groups=C, norm_groups=1, act_layer=nn.SiLU`` computes timm's
function, and its state dict loads as it is.
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from .._utils import check_channels, check_int, check_nchw, check_odd, get_act, mean_expanded_grad
from ..registry import register
from .coord import axis_gate

# version -> (kernel size, channels per convolution group, groups of the group norm)
ELA_VARIANTS: dict[str, tuple[int, int, int]] = {'T': (5, 1, 32), 'B': (7, 1, 16), 'S': (5, 8, 16), 'L': (7, 8, 16)}


@register(
    'ela', paper='ELA: Efficient Local Attention for Deep Convolutional Neural Networks', arxiv='2403.01123',
    year=2024, family='spatial', complexity='O(N·C)',
)
class EfficientLocalAttn(nn.Module):
    """ELA block.

    Args:
        channels: input and output channels C.
        variant: the paper's version, 'T', 'B' (default), 'S' or 'L' (see the module docstring).
        kernel_size: odd size k of the 1-D convolution (default: the variant's, 7 for ELA-B).
        groups: groups of the convolution, dividing C (default: the variant's, C for ELA-B).
        norm_groups: groups of the group norm, dividing C (default: the variant's, 16 for ELA-B).
        shared: one convolution and one norm for both strips (default True, as the released code); False gives
            separate ones named as timm's (``conv_h``, ``conv_w``, ``norm_h``, ``norm_w``).
        bias: bias in the convolution (default False, as the released code).
        act_layer: an activation between the norm and the gate (default None, as the paper; timm: SiLU).
        gate_layer: the gate (default sigmoid).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
            self,
            channels: int,
            *,
            variant: str = 'B',
            kernel_size: int | None = None,
            groups: int | None = None,
            norm_groups: int | None = None,
            shared: bool = True,
            bias: bool = False,
            act_layer: type[nn.Module] | str | None = None,
            gate_layer: type[nn.Module] | str = nn.Sigmoid,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        if variant not in ELA_VARIANTS:
            raise ValueError(f'variant must be one of {sorted(ELA_VARIANTS)}, got {variant!r}')
        k, per_group, gn = ELA_VARIANTS[variant]
        if groups is None:
            if channels % per_group:
                raise ValueError(f'ELA-{variant} convolves groups of {per_group} channels, so channels must be a '
                                 f'multiple of {per_group}, got {channels}; pass groups=')
            groups = channels // per_group
        self.kernel_size = check_odd('kernel_size', k if kernel_size is None else kernel_size)
        self.groups = check_int('groups', groups)
        self.norm_groups = check_int('norm_groups', gn if norm_groups is None else norm_groups)
        for name, value in (('groups', self.groups), ('norm_groups', self.norm_groups)):
            if channels % value:
                raise ValueError(f'{name} must divide channels={channels}, got {value}; pass {name}=')
        self.shared = bool(shared)
        k, pad = self.kernel_size, self.kernel_size // 2
        identity = nn.Identity
        if self.shared:
            self.conv = nn.Conv1d(channels, channels, k, padding=pad, groups=groups, bias=bias, **dd)
            self.norm = nn.GroupNorm(self.norm_groups, channels, **dd)
            self.conv_h, self.conv_w, self.norm_h, self.norm_w = identity(), identity(), identity(), identity()
        else:
            self.conv, self.norm = identity(), identity()
            self.conv_h = nn.Conv2d(channels, channels, (k, 1), padding=(pad, 0), groups=groups, bias=bias, **dd)
            self.conv_w = nn.Conv2d(channels, channels, (1, k), padding=(0, pad), groups=groups, bias=bias, **dd)
            self.norm_h = nn.GroupNorm(self.norm_groups, channels, **dd)
            self.norm_w = nn.GroupNorm(self.norm_groups, channels, **dd)
        self.act = get_act(act_layer)
        self.gate = get_act(gate_layer)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'EfficientLocalAttn')
        if self.shared:
            z_h = mean_expanded_grad(x, [3])  # [B, C, H]
            z_w = mean_expanded_grad(x, [2])  # [B, C, W]
            y_h = self.gate(self.act(self.norm(self.conv(z_h)))).unsqueeze(-1)  # [B, C, H, 1]
            y_w = self.gate(self.act(self.norm(self.conv(z_w)))).unsqueeze(-2)  # [B, C, 1, W]
        else:
            y_h = self.gate(self.act(self.norm_h(self.conv_h(mean_expanded_grad(x, [3], keepdim=True)))))
            y_w = self.gate(self.act(self.norm_w(self.conv_w(mean_expanded_grad(x, [2], keepdim=True)))))
        return axis_gate(x, y_h, y_w)
