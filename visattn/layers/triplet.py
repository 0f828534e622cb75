"""Triplet attention.

Paper: "Rotate to Attend: Convolutional Triplet Attention Module", Misra, Nalamada, Arasanipalai, Hou, WACV 2021,
arXiv:2010.03045 (https://arxiv.org/abs/2010.03045). Released code: https://github.com/landskape-ai/triplet-attention
(``triplet_attention.py``).

Three branches capture the interaction of each pair of the dimensions (C, H, W). A branch rotates the input so that
one dimension comes first, reduces it with the Z-pool (``Z(x) = [max_0(x), mean_0(x)]``, max first, as the code),
and turns the remaining 2-D map into a gate with a k×k convolution (2 → 1, no bias), batch norm and a sigmoid:

    ω_cw = σ(BN(conv_cw(Z_H(x))))   [C, W] plane, broadcast over H   (the released code's ``cw``)
    ω_hc = σ(BN(conv_hc(Z_W(x))))   [H, C] plane, broadcast over W   (``hc``)
    ω_hw = σ(BN(conv_hw(Z_C(x))))   [H, W] plane, broadcast over C   (``hw``, the spatial branch)
    y = x · (ω_cw + ω_hc + ω_hw) / 3      (``no_spatial=True``: y = x · (ω_cw + ω_hc) / 2)

Each convolution sees its plane in the orientation of the released code's permutations (``x.permute(0, 2, 1, 3)``
gives the (C, W) plane, ``x.permute(0, 3, 2, 1)`` the (H, C) plane), so its weights load as they are (module names
``cw``, ``hc``, ``hw``, each ``conv.conv`` and ``conv.bn``). Here no rotated copy of the map is made: each Z-pool
reduces the right axis of ``x`` directly, only the small pooled planes are transposed, and the three gates broadcast
back onto ``x``, which is multiplied once by their sum.

Defaults follow the released code: k = 7, batch norm with momentum 0.01 and ε = 1e-5, the spatial branch on. The
released ImageNet results include k = 3 as well (``kernel_size=3``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_channels, check_nchw, check_odd, needs_grad
from ..registry import register


class _ZPoolGate(nn.Module):
    """A branch's conv (2 → 1, k×k, no bias) + batch norm + sigmoid over its Z-pooled plane [B, 2, P, Q]."""

    def __init__(self, kernel_size: int, dd: dict) -> None:
        super().__init__()
        self.conv = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False, **dd),
            bn=nn.BatchNorm2d(1, eps=1e-5, momentum=0.01, **dd),
        ))

    def forward(self, pooled: Tensor) -> Tensor:
        return torch.sigmoid(self.conv(pooled))  # [B, 1, P, Q]


def _zpool(x: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """``[max, mean]`` of x over ``dim``, stacked at dim 1 (mean accumulated in ``dtype``, then x's dtype). The max
    with its indices, as the released code: its backward scatters to one position instead of comparing the map."""
    mean = x.sum(dim, dtype=dtype) / x.shape[dim]
    return torch.stack([torch.max(x, dim)[0], mean.to(x.dtype)], 1)


@register(
    'triplet', paper='Rotate to Attend: Convolutional Triplet Attention Module', arxiv='2010.03045', year=2021,
    family='spatial', complexity='O(N·C + k²·(C·H + C·W + H·W))',
)
class TripletAttn(nn.Module):
    """Triplet attention block.

    Args:
        channels: input and output channels C.
        kernel_size: size k of the three convolutions, odd (default 7, as the released code).
        no_spatial: drop the (H, W) branch and average the other two (default False, as the released code).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W]. In training mode each branch's batch norm needs more than one value per
        plane (e.g. not a 1×1 map with a batch of 1).
    """

    def __init__(
            self,
            channels: int,
            *,
            kernel_size: int = 7,
            no_spatial: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.kernel_size = check_odd('kernel_size', kernel_size)
        self.no_spatial = bool(no_spatial)
        self.cw = _ZPoolGate(kernel_size, dd)
        self.hc = _ZPoolGate(kernel_size, dd)
        self.hw = None if no_spatial else _ZPoolGate(kernel_size, dd)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'TripletAttn')
        B, C, H, W = x.shape
        ct = torch.promote_types(x.dtype, torch.float32)
        scale = 1 / 2 if self.hw is None else 1 / 3
        w_cw = self.cw(_zpool(x, 2, ct)) * scale  # (C, W) plane: [B, 1, C, W]
        w_hc = self.hc(_zpool(x, 3, ct).transpose(2, 3)) * scale  # (H, C) plane: [B, 1, H, C]
        s = w_cw.view(B, C, 1, W) + w_hc.permute(0, 3, 2, 1)  # [B, C, H, W]
        hw = self.hw
        if hw is not None:
            w_hw = hw(_zpool(x, 1, ct)) * scale  # (H, W) plane: [B, 1, H, W]
            s.add_(w_hw)  # s is a fresh sum: autograd allows the update
        if not torch.jit.is_scripting() and not needs_grad([x, s]):
            return s.mul_(x)
        return x * s
