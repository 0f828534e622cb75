"""Lightweight non-local block (LightNL, of AutoNL).

Paper: "Neural Architecture Search for Lightweight Non-Local Networks", Li, Jin, Mei, Lian, Yang, Xie, Yu, Zhou, Bai,
Yuille, CVPR 2020, arXiv:2004.01961 (https://arxiv.org/abs/2004.01961). Released code:
https://github.com/LiYingwei/AutoNL (``model_def.py``: ``non_local_op`` and ``MnasBlock._call_non_local``).

Starting from the dot-product non-local block ``y = θ(x) φ(x)ᵀ g(x) / C(x)``, the paper shares the three
transformations and then drops them (``y = x xᵀ x / C(x)``), replaces the output transform W_z by a 3×3 depthwise
conv, and computes the affinity from compact features: ``x_c`` keeps the first ``r·C`` channels, ``x_s`` subsamples the
positions by a stride s, ``x_sc`` does both:

    y = x_c x_scᵀ x_s / (H·W),      z = x + BN(DWConv_{3×3}(y)).

No softmax: the product is associative, so it is evaluated in the cheaper order, ``(x_c x_scᵀ) x_s`` (cost
N·M·(rC + C)) or ``x_c (x_scᵀ x_s)`` (cost (N + M)·rC·C), N = H·W, M the subsampled count, as the released code
chooses. Defaults as the released code: r = 1 and s = 1 (what its block string ``nonlocal`` means without values; the
searched AutoNL-S/L models set them per block), subsampling by striding (``x[::s, ::s]``), C(x) = H·W of the input
(also when the keys are subsampled), depthwise conv without bias, and the batch norm's scale starting at 0
(``nl_zero_init``), so that the block starts as the identity. ``subsample='avg'`` / ``'max'`` pools instead of striding
(ceil mode, so odd sizes keep their last row and column); ``transform='none'`` drops the depthwise conv. Compute is in
float32 at least (float64 stays float64).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_channels, check_float, check_int, check_nchw, check_odd
from ..registry import register

__all__ = ['LightNonLocal']

_SUBSAMPLE = ('stride', 'avg', 'max')
_TRANSFORM = ('dw', 'none')


@register(
    'lightnl', paper='Neural Architecture Search for Lightweight Non-Local Networks', arxiv='2004.01961', year=2020,
    family='context', complexity='O(N·r·C²)',
)
class LightNonLocal(nn.Module):
    """LightNL: a transformation-free dot-product non-local block on compact features, with a depthwise output conv.

    Args:
        channels: input and output channels C.
        channel_ratio: r, the fraction of channels in the affinity, in (0, 1] (default 1, the released code's default;
            ``int(r·C)`` channels, at least 1).
        stride: s, the subsampling of the key/value positions (default 1).
        subsample: ``'stride'`` (every s-th row and column, the released code), ``'avg'`` or ``'max'`` pooling.
        kernel_size: odd size of the depthwise output conv (default 3).
        transform: ``'dw'`` (the depthwise conv, default) or ``'none'`` (no output transform, only the norm).
        norm_layer: the norm after the depthwise conv (default BatchNorm2d).
        zero_init: start the norm's scale at 0 (default True, the released ``nl_zero_init``): the block starts as the
            identity.
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
            self,
            channels: int,
            *,
            channel_ratio: float = 1.0,
            stride: int = 1,
            subsample: str = 'stride',
            kernel_size: int = 3,
            transform: str = 'dw',
            norm_layer: type[nn.Module] = nn.BatchNorm2d,
            zero_init: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.channel_ratio = check_float('channel_ratio', channel_ratio, 0., 1., low_open=True)
        self.rd_channels = max(1, int(self.channel_ratio * channels))
        self.stride = check_int('stride', stride)
        if subsample not in _SUBSAMPLE:
            raise ValueError(f'subsample must be one of {_SUBSAMPLE}, got {subsample!r}')
        if transform not in _TRANSFORM:
            raise ValueError(f'transform must be one of {_TRANSFORM}, got {transform!r}')
        self.subsample = subsample
        k = check_odd('kernel_size', kernel_size)
        self.conv = (nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels, bias=False, **dd)
                     if transform == 'dw' else nn.Identity())
        self.norm = norm_layer(channels, **dd)
        self.zero_init = bool(zero_init)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The depthwise conv N(0, 2/(k²·C)) as the released code; the norm's scale 0 with ``zero_init``."""
        if isinstance(self.conv, nn.Conv2d):
            nn.init.kaiming_normal_(self.conv.weight, mode='fan_out', nonlinearity='relu')
        self.norm.reset_parameters()
        if self.zero_init:
            nn.init.zeros_(self.norm.weight)

    def _compact(self, x: Tensor) -> Tensor:
        s = self.stride
        if s == 1:
            return x
        if self.subsample == 'stride':
            return x[:, :, ::s, ::s]
        kernel = [min(s, x.shape[-2]), min(s, x.shape[-1])]
        if self.subsample == 'avg':
            return F.avg_pool2d(x, kernel, kernel, ceil_mode=True)
        return F.max_pool2d(x, kernel, kernel, ceil_mode=True)

    def affinity(self, x: Tensor) -> Tensor:
        """``y = x_c x_scᵀ x_s / (H·W)`` of ``x: [B, C, H, W]``, in float32 at least: [B, C, H, W]."""
        b, c, h, w = x.shape
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xs = self._compact(xf).flatten(2)  # x_s: [B, C, M]
        xc = xf.flatten(2)[:, :self.rd_channels]  # x_c: [B, rC, N]
        xsc = xs[:, :self.rd_channels]  # x_sc: [B, rC, M]
        n, m, r = h * w, xs.shape[-1], self.rd_channels
        if n * m * (r + c) < (n + m) * r * c:
            y = torch.bmm(xs, torch.bmm(xsc.transpose(1, 2), xc))  # the M×N affinity x_scᵀ x_c first: [B, M, N]
        else:
            y = torch.bmm(torch.bmm(xs, xsc.transpose(1, 2)), xc)  # (x_s x_scᵀ) x_c: [B, C, rC] then [B, C, N]
        return (y / n).view(b, c, h, w).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'LightNonLocal')
        return x + self.norm(self.conv(self.affinity(x)))
