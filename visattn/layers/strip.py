"""Strip pooling attention: the strip pooling module (SPM) as a gate.

Paper: "Strip Pooling: Rethinking Spatial Pooling for Scene Parsing", Hou, Zhang, Cheng, Feng, CVPR 2020,
arXiv:2003.13328 (https://arxiv.org/abs/2003.13328). Released code: https://github.com/Andrew-Qibin/SPNet
(``SPBlock`` in ``models/resnet.py``).

The SPM pools each row and each column, ``y^h_c(i) = 1/W Σ_j x_c(i, j)`` ([B, C, H, 1]) and
``y^w_c(j) = 1/H Σ_i x_c(i, j)`` ([B, C, 1, W]), convolves each strip along itself with a 1-D kernel (3×1 on the
rows, 1×3 on the columns), expands both to H × W and fuses them by a sum, ``y_c(i, j) = y^h_c(i) + y^w_c(j)``; a
1×1 convolution f and a sigmoid then gate the input, ``z = x · σ(f(y))``. The released code, followed here, spells
out what the paper's figure leaves implicit: the strip convolutions are full C → C convolutions without bias, each
followed by batch norm, the sum passes a ReLU before f, and f has a bias:
``z = x · σ(W_f ReLU(BN_h(K_h ∗ y^h) + BN_w(K_w ∗ y^w)) + b_f)``. SPNet puts the SPM after the 3×3 convolution of
the last bottleneck of ResNet stages 1-3 and of every bottleneck of stage 4, gating the block's own features. (The
paper's mixed pooling module, MPM, is a segmentation head that adds pyramid pooling branches; it is not this block.)

timm's ``StripAttn`` is a minimal version of the SPM: depthwise strip convolutions, no batch norm, no ReLU and no
1×1 fusion, ``z = x · σ(k_h ∗ y^h + k_w ∗ y^w)`` (and ``use_conv=False`` drops the convolutions too).
``groups=C, norm_layer=None, fuse=False`` computes timm's function, and its state dict loads as it is
(``conv_h``, ``conv_w``).

In training mode each strip's batch norm runs over B·H (or B·W) values, so a batch of one 1×1 map cannot train.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_channels, check_int, check_nchw, check_odd, get_act, mean_expanded_grad, needs_grad
from ..registry import register


@register(
    'strip', paper='Strip Pooling: Rethinking Spatial Pooling for Scene Parsing', arxiv='2003.13328', year=2020,
    family='spatial', complexity='O(N·C²)',
)
class StripAttn(nn.Module):
    """Strip pooling module (SPM) as a gate.

    Args:
        channels: input and output channels C.
        kernel_size: odd length k of the strip convolutions (default 3, as the paper's 3×1 and 1×3).
        groups: groups of the strip convolutions, dividing C (default 1, as the released code; timm: C).
        bias: bias in the strip convolutions (default False: they are followed by batch norm).
        use_conv: convolve the strips (default True); False gates the pooled strips directly.
        norm_layer: the norm after each strip convolution (default BatchNorm2d; None for none).
        fuse: the ReLU and 1×1 convolution (with bias) on the fused strips before the gate (default True).
        act_layer: the activation before the 1×1 convolution (default ReLU).
        gate_layer: the gate (default sigmoid).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
            self,
            channels: int,
            *,
            kernel_size: int = 3,
            groups: int = 1,
            bias: bool = False,
            use_conv: bool = True,
            norm_layer: type[nn.Module] | None = nn.BatchNorm2d,
            fuse: bool = True,
            act_layer: type[nn.Module] | str = nn.ReLU,
            gate_layer: type[nn.Module] | str = nn.Sigmoid,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.kernel_size = k = check_odd('kernel_size', kernel_size)
        self.groups = check_int('groups', groups)
        if channels % groups:
            raise ValueError(f'groups must divide channels={channels}, got {groups}; pass groups=')
        self.use_conv = bool(use_conv)
        if use_conv:
            self.conv_h = nn.Conv2d(channels, channels, (k, 1), padding=(k // 2, 0), groups=groups, bias=bias, **dd)
            self.conv_w = nn.Conv2d(channels, channels, (1, k), padding=(0, k // 2), groups=groups, bias=bias, **dd)
        else:
            self.conv_h, self.conv_w = nn.Identity(), nn.Identity()
        if norm_layer is not None:
            self.norm_h, self.norm_w = norm_layer(channels, **dd), norm_layer(channels, **dd)
        else:
            self.norm_h, self.norm_w = nn.Identity(), nn.Identity()
        self.fuse = bool(fuse)
        self.act = get_act(act_layer, inplace=True) if fuse else nn.Identity()
        self.conv_fuse = nn.Conv2d(channels, channels, 1, **dd) if fuse else nn.Identity()
        self.gate = get_act(gate_layer)
        self.sigmoid_gate = isinstance(self.gate, nn.Sigmoid)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'StripAttn')
        y_h = self.norm_h(self.conv_h(mean_expanded_grad(x, [3], keepdim=True)))  # [B, C, H, 1]
        y_w = self.norm_w(self.conv_w(mean_expanded_grad(x, [2], keepdim=True)))  # [B, C, 1, W]
        y = self.conv_fuse(self.act(y_h + y_w))  # [B, C, H, W]
        if not torch.jit.is_scripting() and self.sigmoid_gate and not needs_grad([x, y]):
            return y.sigmoid_().mul_(x)  # inference: gated in place
        return x * self.gate(y)
