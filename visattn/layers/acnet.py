"""Asymmetric Convolution Block (ACB): a k×k, a 1×k and a k×1 conv, each with its batch norm, summed for training;
one k×k conv for inference.

Paper: "ACNet: Strengthening the Kernel Skeletons for Powerful CNN via Asymmetric Convolution Blocks", Ding, Guo,
Ding, Han, ICCV 2019, arXiv:1908.03930 (https://arxiv.org/abs/1908.03930).

Training form, for an input ``x`` [B, C, H, W]:

``y = BN_s(W_s ∗ x) + BN_h(W_h ∗ x) + BN_v(W_v ∗ x)``

with ``W_s`` k×k, ``W_h`` 1×k (padded by k//2 columns) and ``W_v`` k×1 (padded by k//2 rows), so that the three
sliding windows share their centres at every stride and dilation. By the additivity of convolution (the paper's
"branch fusion" after "BN fusion"), the eval-mode block is one k×k conv:

``W = a_s W_s + a_h W_h ↑ + a_v W_v ↑``, ``b = d_s + d_h + d_v``

with ``a = γ/√(σ² + ε)``, ``d = β − μ a`` of each branch's batch norm and ``↑`` placing a 1×k (k×1) kernel on the
centre row (column) of the k×k one: the asymmetric kernels strengthen the kernel's "skeleton". `reparameterize`
replaces the branches by that conv (``reparam_conv``) in place.

The block replaces a conv and its batch norm; the activation that follows stays outside (``act_layer=None``, the
default), as in the paper's ResNets. For k > 3 the side branches are 1×k and k×1 (the released code's current
behaviour; its first version added 1×3 and 3×1 onto a k×k kernel). The children keep the released code's names
(``square_conv``, ``square_bn``, ``hor_conv``, ``hor_bn``, ``ver_conv``, ``ver_bn``); its deployed ``fused_conv``
is ``reparam_conv`` here, as in every visattn re-parameterisable block.
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from ..registry import register
from ._reparam import ReparamConvBlock, fuse_bn, pad_kernel

__all__ = ['AsymConvBlock']


@register(
    'acnet', paper='ACNet: Strengthening the Kernel Skeletons for Powerful CNN via Asymmetric Convolution Blocks',
    arxiv='1908.03930', year=2019, family='reparam', complexity='O(N·C²·k²)',
)
class AsymConvBlock(ReparamConvBlock):
    """ACNet's asymmetric convolution block: k×k + 1×k + k×1 conv-BN branches summed; one k×k conv once deployed.

    Args:
        channels: input channels C.
        out_channels: output channels (default C).
        kernel_size: the odd kernel size k (default 3).
        stride: stride of every branch (default 1).
        dilation: dilation of every branch (default 1).
        groups: groups of every branch (default 1).
        act_layer: activation after the sum (default None: the block replaces a conv-BN pair).
        deploy: build the deploy form (one k×k conv with bias) directly.
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, out_channels, ⌈H / stride⌉, ⌈W / stride⌉].
    """

    branch_names = ('square_conv', 'square_bn', 'hor_conv', 'hor_bn', 'ver_conv', 'ver_bn')

    def __init__(
            self,
            channels: int,
            *,
            out_channels: int | None = None,
            kernel_size: int = 3,
            stride: int = 1,
            dilation: int = 1,
            groups: int = 1,
            act_layer: type[nn.Module] | str | None = None,
            deploy: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(channels, out_channels, kernel_size, stride, dilation, groups, act_layer, deploy,
                         device=device, dtype=dtype)
        dd = dict(device=device, dtype=dtype)
        c, o, k, p = self.in_channels, self.out_channels, kernel_size, self.padding
        self.square_conv: nn.Conv2d | None = None
        self.square_bn: nn.BatchNorm2d | None = None
        self.hor_conv: nn.Conv2d | None = None
        self.hor_bn: nn.BatchNorm2d | None = None
        self.ver_conv: nn.Conv2d | None = None
        self.ver_bn: nn.BatchNorm2d | None = None
        if not deploy:
            conv = dict(stride=stride, dilation=dilation, groups=groups, bias=False, **dd)
            self.square_conv = nn.Conv2d(c, o, k, padding=p, **conv)
            self.square_bn = nn.BatchNorm2d(o, **dd)
            self.hor_conv = nn.Conv2d(c, o, (1, k), padding=(0, p), **conv)
            self.hor_bn = nn.BatchNorm2d(o, **dd)
            self.ver_conv = nn.Conv2d(c, o, (k, 1), padding=(p, 0), **conv)
            self.ver_bn = nn.BatchNorm2d(o, **dd)

    def forward_branches(self, x: Tensor) -> Tensor:
        y = self.square_bn(self.square_conv(x))
        y = y + self.hor_bn(self.hor_conv(x))
        return y + self.ver_bn(self.ver_conv(x))

    def equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        kernel, bias = fuse_bn(self.square_conv.weight, self.square_bn)
        for conv, bn in ((self.hor_conv, self.hor_bn), (self.ver_conv, self.ver_bn)):
            k, b = fuse_bn(conv.weight, bn)
            kernel, bias = kernel + pad_kernel(k, self.kernel_size), bias + b
        return kernel, bias

    def branch_output_norms(self) -> list[nn.BatchNorm2d]:
        return [self.square_bn, self.hor_bn, self.ver_bn]
