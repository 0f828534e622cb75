"""Spatial Group-wise Enhance (SGE).

Paper: "Spatial Group-wise Enhance: Improving Semantic Feature Learning in Convolutional Networks", Li, Hu, Yang,
2019, arXiv:1905.09646 (https://arxiv.org/abs/1905.09646). Released code: https://github.com/implus/PytorchInsight
(``classification/models/imagenet/resnet_sge.py``).

The C channels are split into G groups of C/G channels; within a group, every position i has a feature vector
``x_i`` and the group's global one is ``g = 1/m Σ_i x_i`` over the m = H·W positions (global average pooling). Per
group and position:

    c_i = g · x_i                                      (the similarity of the position with the group)
    ĉ_i = (c_i − μ_c) / (σ_c + ε),  μ_c, σ_c the mean and standard deviation of c over the m positions
    a_i = γ ĉ_i + β                                    (γ, β: one pair per group)
    x̂_i = x_i · sigmoid(a_i)

Defaults follow the released code: G = 64, ε = 1e-5 added to σ (not to σ²), γ initialised to 0 and β to 1 (so the
block starts as ``x · σ(1)``), and σ_c the unbiased standard deviation (``torch.std``, divisor m − 1);
``unbiased=False`` divides by m instead. Parameter names (``weight`` = γ and ``bias`` = β, shape [1, G, 1, 1]) are
those of the released module, so its state dict loads as it is.

A 1×1 map has ``c_i = μ_c``: ĉ is defined as 0 (the released code divides 0 by the NaN standard deviation of one
value), so ``x̂ = x · σ(β)``. A constant similarity map (σ_c = 0) gives ĉ = 0 and a finite gradient too.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_channels, check_float, check_int, check_nchw, float_tiny
from ..registry import register


@register(
    'sge', paper='Spatial Group-wise Enhance: Improving Semantic Feature Learning in Convolutional Networks',
    arxiv='1905.09646', year=2019, family='spatial', complexity='O(N·C)',
)
class SpatialGroupEnhance(nn.Module):
    """SGE block.

    Args:
        channels: input and output channels C.
        groups: G, the number of groups (default 64); must divide C.
        eps: ε added to the standard deviation, > 0 (default 1e-5).
        unbiased: the standard deviation over positions with divisor m − 1 (default True, the released code's
            ``torch.std``) or m (False).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
            self,
            channels: int,
            *,
            groups: int = 64,
            eps: float = 1e-5,
            unbiased: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.groups = check_int('groups', groups)
        if channels % groups:
            raise ValueError(f'groups must divide channels={channels}, got groups={groups}')
        self.eps = check_float('eps', eps, 0., None, low_open=True)
        self.unbiased = bool(unbiased)
        self.weight = nn.Parameter(torch.empty(1, groups, 1, 1, **dd))
        self.bias = nn.Parameter(torch.empty(1, groups, 1, 1, **dd))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """γ = 0 and β = 1, as the released code."""
        nn.init.zeros_(self.weight)
        nn.init.ones_(self.bias)

    def extra_repr(self) -> str:
        return f'{self.channels}, groups={self.groups}, eps={self.eps:g}, unbiased={self.unbiased}'

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'SpatialGroupEnhance')
        B, C, H, W = x.shape
        m = H * W
        ct = torch.promote_types(x.dtype, torch.float32)
        xg = x.to(ct).reshape(B * self.groups, C // self.groups, m)  # [B·G, C/G, m]
        g = xg.sum(-1, keepdim=True) / m  # [B·G, C/G, 1]: the group's global feature
        c = torch.matmul(g.transpose(1, 2), xg).view(B, self.groups, m)  # g · x_i at every position: [B, G, m]
        c = c - c.sum(-1, keepdim=True) / m
        n = max(m - 1, 1) if self.unbiased else m
        # σ over the positions; the tiny offset only keeps the gradient of the square root finite where σ = 0
        std = torch.sqrt(c.square().sum(-1, keepdim=True) / n + float_tiny(ct))
        a = torch.addcmul(self.bias.view(1, -1, 1).to(ct), c / (std + self.eps), self.weight.view(1, -1, 1).to(ct))
        gate = torch.sigmoid(a).view(B * self.groups, 1, m)
        return (xg * gate).view(B, C, H, W).to(x.dtype)
