"""Effective Squeeze-Excitation (eSE).

Paper: "CenterMask: Real-Time Anchor-Free Instance Segmentation", Lee, Park, CVPR 2020, arXiv:1911.06667
(https://arxiv.org/abs/1911.06667), Sec. 3.3 (VoVNetV2).

SE without the bottleneck: the two fully connected layers C → C/r → C, whose reduction loses channel information,
become one C → C layer (1×1 conv with bias), ``y = x ⊙ σ_h(W GAP(x) + b)``. The paper writes the gate as σ; the
released code (``eSEModule`` in youngwanLEE/vovnet-detectron2 and CenterMask) gates with the hard sigmoid
``σ_h(t) = ReLU6(t + 3) / 6``, and so do timm's ``EffectiveSEModule`` and this block by default (``gate_layer``
takes any other). The default gate is computed as the released code writes it (`HardSigmoid`): PyTorch's
``nn.Hardsigmoid``, which timm builds, has the same values but a backward that multiplies by 1/6 rounded to
float32, also in float64. VoVNetV2 puts one eSE after the 1×1 aggregation conv of every OSA module, before the residual
addition. Module names follow timm's (``fc``), so its weights load as they are.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_channels, check_nchw, get_act
from ..registry import register


class HardSigmoid(nn.Module):
    """The hard sigmoid ``ReLU6(t + 3) / 6``, exact in float64 forward and backward.

    Shapes:
        t: any -> the same.
    """

    def forward(self, t: Tensor) -> Tensor:
        return F.relu6(t + 3.) / 6.


@register(
    'ese', paper='CenterMask: Real-Time Anchor-Free Instance Segmentation', arxiv='1911.06667', year=2020,
    family='channel', complexity='O(N·C)',
)
class EffectiveSqueezeExcite(nn.Module):
    """eSE block: global average pooling, one C → C fully connected layer, hard-sigmoid gate.

    Args:
        channels: input and output channels C.
        gate_layer: gating activation (default hard sigmoid, as the released code and timm).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
            self,
            channels: int,
            *,
            gate_layer: type[nn.Module] | str = HardSigmoid,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        self.channels = check_channels(channels)
        self.fc = nn.Conv2d(channels, channels, 1, device=device, dtype=dtype)
        self.gate = get_act(gate_layer)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'EffectiveSqueezeExcite')
        ct = torch.promote_types(x.dtype, torch.float32)
        s = x.sum([2, 3], keepdim=True, dtype=ct) / (x.shape[2] * x.shape[3])  # [B, C, 1, 1]; backward: a view
        return x * self.gate(self.fc(s.to(x.dtype)))
