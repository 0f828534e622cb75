"""Diverse Branch Block (DBB): four branches of different scales and complexities summed for training, one k×k conv
for inference.

Paper: "Diverse Branch Block: Building a Convolution as an Inception-like Unit", Ding, Zhang, Han, Ding, CVPR 2021,
arXiv:2103.13425 (https://arxiv.org/abs/2103.13425).

The DBB instance of the paper's Fig. 1 (the one of its ImageNet ResNets), for an input ``x`` [B, C, H, W], with
every conv bias-free and followed by a batch norm:

``y = BN(K×K ∗ x) + BN(1×1 ∗ x) + BN(AVG_k(BN'(1×1 ∗ x))) + BN(K×K ∗ BN'(1×1 ∗ x))``

(the k×k average pooling and the k×k conv of the last two branches carry the block's stride). In eval mode a batch
norm is the affine map ``a ⊙ y + d`` and the block is one k×k conv, by the paper's transformations (Sect. 3.2):
I (conv-BN fusion), II (branch addition), III (1×1 then k×k: ``W₂ W₁`` and ``b₂ + Σ W₂ b₁``), V (average pooling
as a conv with ``1/k²`` taps) and VI (a 1×1 kernel zero-padded to k×k). `reparameterize` replaces the branches by
that conv (``reparam_conv``) in place.

Where the released code (DingXiaoH/DiverseBranchBlock) makes choices the paper's text leaves open, this module
follows it, with the released names (``dbb_origin``, ``dbb_1x1``, ``dbb_avg``, ``dbb_1x1_kxk``, so its training-time
block weights load; its deployed ``dbb_reparam`` is ``reparam_conv`` here):

- The batch norm ``BN'`` inside the two sequential branches pads its output by k//2 pixels with its own value at 0,
  ``d`` (the released ``BNAndPadLayer``), and the pooling / k×k conv after it use no padding: the k×k window
  then sees ``d`` outside the map, exactly what the fused conv sees (it zero-pads ``x``, and ``BN'(1×1 ∗ 0) = d``),
  which makes transformation III exact at the borders. The border value comes from the running statistics with
  γ and β detached, in training as in eval (``pad_stats='running'``, the released code); ``pad_stats='batch'``
  uses the statistics the batch norm normalises with (the batch's in training) and keeps the gradient.
- The first 1×1 conv of the 1×1–k×k branch has ``internal_channels`` = C outputs and is identity-based: its kernel
  is ``I + W`` with ``W`` starting at 0 (``idconv1``); other widths (the released code uses 2C for depthwise
  convs) get a plain 1×1 conv (``conv1``).
- A depthwise block (groups = C = C_out) has no 1×1 branch and pools ``x`` directly (zero padding counted).
- Every batch norm starts at γ = 1 (the paper's experiments); `init_gamma` sets the last one of every branch.

The block replaces a conv and its batch norm: the activation stays outside (``act_layer=None``, the default).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_int
from ..registry import register
from ._reparam import ConvBn, ReparamConvBlock, avg_kernel, fuse_bn, identity_kernel, merge_1x1_kxk, pad_kernel

__all__ = ['BnPad', 'DiverseBranchBlock', 'IdentityConv1x1']

_PAD_STATS = ('running', 'batch')


class BnPad(nn.Module):
    """A batch norm whose output is padded by ``pad`` pixels on every side with the batch norm's value at 0.

    Shapes:
        x: [B, C, H, W] -> [B, C, H + 2·pad, W + 2·pad].
    """

    def __init__(self, channels: int, pad: int, pad_stats: str = 'running', device=None, dtype=None) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, device=device, dtype=dtype)
        self.pad = pad
        self.pad_stats = pad_stats

    def zero_value(self, x: Tensor) -> Tensor:
        """``BN(0)`` per channel [C]: from the running statistics (γ, β detached), or with ``pad_stats='batch'``
        from the statistics the batch norm normalises ``x`` with."""
        bn = self.bn
        ct = torch.promote_types(x.dtype, torch.float32)
        mean, var = bn.running_mean, bn.running_var
        if self.pad_stats == 'batch' and (self.training or mean is None or var is None):
            var, mean = torch.var_mean(x.to(ct), dim=[0, 2, 3], unbiased=False)
        if mean is None or var is None:
            raise ValueError('BnPad: the batch norm keeps no running statistics; use pad_stats="batch"')
        scale = torch.rsqrt(var.to(ct) + bn.eps)
        weight, bias = bn.weight, bn.bias
        detach = self.pad_stats == 'running'
        if weight is not None:
            scale = scale * (weight.detach() if detach else weight).to(ct)
        value = -mean.to(ct) * scale
        if bias is not None:
            value = value + (bias.detach() if detach else bias).to(ct)
        return value

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(x)
        if self.pad == 0:
            return y
        v = self.zero_value(x).to(y.dtype).view(1, -1, 1, 1)
        return F.pad(y - v, [self.pad, self.pad, self.pad, self.pad]) + v


class IdentityConv1x1(nn.Module):
    """A grouped 1×1 conv C -> C whose kernel is ``I + W``, ``W`` starting at 0 (DBB's identity-based 1×1 conv)."""

    def __init__(self, channels: int, groups: int = 1, device=None, dtype=None) -> None:
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(channels, channels // groups, 1, 1, device=device, dtype=dtype))
        self.register_buffer('eye', identity_kernel(channels, groups, 1, device=device, dtype=dtype), persistent=False)

    def actual_kernel(self) -> Tensor:
        """The kernel ``I + W`` [C, C/groups, 1, 1]."""
        return self.weight + self.eye.to(self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.actual_kernel(), groups=self.groups)


@register(
    'dbb', paper='Diverse Branch Block: Building a Convolution as an Inception-like Unit', arxiv='2103.13425',
    year=2021, family='reparam', complexity='O(N·C²·k²)',
)
class DiverseBranchBlock(ReparamConvBlock):
    """The Diverse Branch Block of the paper's Fig. 1: k×k, 1×1, 1×1–AVG and 1×1–k×k branches, each ending in a
    batch norm, summed; one k×k conv once deployed.

    Args:
        channels: input channels C.
        out_channels: output channels (default C).
        kernel_size: the odd kernel size k (default 3).
        stride: stride of every branch (default 1).
        dilation: must be 1 (accepted so that a backbone can pass its convs' dilation; a dilated DBB is refused).
        groups: groups of every conv (default 1); groups = C = out_channels is the depthwise form.
        internal_channels: width of the 1×1–k×k branch (default C, identity-based; 2C for a depthwise block, as
            the released MobileNet).
        pad_stats: statistics of the padded border of the sequential branches: ``'running'`` (default, the
            released code) or ``'batch'`` (see the module docstring); both are the same in eval mode.
        act_layer: activation after the sum (default None: the block replaces a conv-BN pair).
        deploy: build the deploy form (one k×k conv with bias) directly.
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, out_channels, ⌈H / stride⌉, ⌈W / stride⌉].
    """

    branch_names = ('dbb_origin', 'dbb_1x1', 'dbb_avg', 'dbb_1x1_kxk')

    def __init__(
            self,
            channels: int,
            *,
            out_channels: int | None = None,
            kernel_size: int = 3,
            stride: int = 1,
            dilation: int = 1,
            groups: int = 1,
            internal_channels: int | None = None,
            pad_stats: str = 'running',
            act_layer: type[nn.Module] | str | None = None,
            deploy: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(channels, out_channels, kernel_size, stride, dilation, groups, act_layer, deploy,
                         device=device, dtype=dtype)
        if dilation != 1:
            raise ValueError(f'dilation: the Diverse Branch Block has no dilated form (its average pooling has no '
                             f'dilation), got {dilation}')
        if pad_stats not in _PAD_STATS:
            raise ValueError(f'pad_stats must be one of {_PAD_STATS}, got {pad_stats!r}')
        c, o, k, p = self.in_channels, self.out_channels, kernel_size, self.padding
        self.dense = groups < o
        if not self.dense and c != o:
            raise ValueError(f'groups = out_channels ({o}) is the depthwise form, which needs channels = out_channels, '
                             f'got {c} -> {o}')
        if internal_channels is None:
            internal_channels = c if self.dense else 2 * c
        self.internal_channels = check_int('internal_channels', internal_channels)
        if internal_channels % groups:
            raise ValueError(f'groups ({groups}) must divide internal_channels, got {internal_channels}')
        self.pad_stats = pad_stats
        dd = dict(device=device, dtype=dtype)
        self.dbb_origin: ConvBn | None = None
        self.dbb_1x1: ConvBn | None = None
        self.dbb_avg: nn.Sequential | None = None
        self.dbb_1x1_kxk: nn.Sequential | None = None
        if deploy:
            return
        self.dbb_origin = ConvBn(c, o, k, stride=stride, padding=p, groups=groups, **dd)
        self.dbb_avg = nn.Sequential()
        if self.dense:
            self.dbb_1x1 = ConvBn(c, o, 1, stride=stride, groups=groups, **dd)
            self.dbb_avg.add_module('conv', nn.Conv2d(c, o, 1, groups=groups, bias=False, **dd))
            self.dbb_avg.add_module('bn', BnPad(o, p, pad_stats, **dd))
            self.dbb_avg.add_module('avg', nn.AvgPool2d(k, stride))
        else:
            self.dbb_avg.add_module('avg', nn.AvgPool2d(k, stride, padding=p))
        self.dbb_avg.add_module('avgbn', nn.BatchNorm2d(o, **dd))
        m = internal_channels
        self.dbb_1x1_kxk = nn.Sequential()
        if m == c:
            self.dbb_1x1_kxk.add_module('idconv1', IdentityConv1x1(c, groups, **dd))
        else:
            self.dbb_1x1_kxk.add_module('conv1', nn.Conv2d(c, m, 1, groups=groups, bias=False, **dd))
        self.dbb_1x1_kxk.add_module('bn1', BnPad(m, p, pad_stats, **dd))
        self.dbb_1x1_kxk.add_module('conv2', nn.Conv2d(m, o, k, stride, groups=groups, bias=False, **dd))
        self.dbb_1x1_kxk.add_module('bn2', nn.BatchNorm2d(o, **dd))

    def forward_branches(self, x: Tensor) -> Tensor:
        y = self.dbb_origin(x)
        if self.dbb_1x1 is not None:
            y = y + self.dbb_1x1(x)
        y = y + self.dbb_avg(x)
        return y + self.dbb_1x1_kxk(x)

    def equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        g, k = self.groups, self.kernel_size
        kernel, bias = self.dbb_origin.fused()
        if self.dbb_1x1 is not None:
            k1, b1 = self.dbb_1x1.fused()
            kernel, bias = kernel + pad_kernel(k1, k), bias + b1
        avg = self.dbb_avg
        ka, ba = fuse_bn(avg_kernel(self.out_channels, g, k, device=kernel.device, dtype=kernel.dtype), avg.avgbn)
        if self.dense:
            ka, ba = merge_1x1_kxk(*fuse_bn(avg.conv.weight, avg.bn.bn), ka, ba, g)
        seq = self.dbb_1x1_kxk
        first = seq.idconv1.actual_kernel() if hasattr(seq, 'idconv1') else seq.conv1.weight
        km, bm = merge_1x1_kxk(*fuse_bn(first, seq.bn1.bn), *fuse_bn(seq.conv2.weight, seq.bn2), g)
        return kernel + ka + km, bias + ba + bm

    def branch_output_norms(self) -> list[nn.BatchNorm2d]:
        norms = [self.dbb_origin.bn] + ([self.dbb_1x1.bn] if self.dbb_1x1 is not None else [])
        return norms + [self.dbb_avg.avgbn, self.dbb_1x1_kxk.bn2]

