"""Skip-Squeeze-Excitation (SSE), the gate of ParNet.

Paper: "Non-deep Networks", Goyal, Bochkovskiy, Deng, Koltun, NeurIPS 2022, arXiv:2110.07641
(https://arxiv.org/abs/2110.07641).

ParNet's RepVGG-style block adds three branches: a 3×3 conv-BN, a 1×1 conv-BN and the skip branch, whose batch norm
is gated by a squeeze-excitation with a single fully connected layer and no reduction (Figure 2). This module is
that skip branch:

``y = BN(x) ⊙ σ(W GAP(BN(x)))`` with W a 1×1 conv C → C.

The gate is computed from the normalised input and multiplies the normalised input, as the released code does
(imankgoyal/NonDeepNetworks, ``RepVGGBlock``: ``id_out = rbr_identity(x); id_out = id_out * se(id_out)``); its
``ConvSig`` has no bias (``bias=False``, the default here). The 3×3 and 1×1 branches and the activation after the sum
belong to the ParNet block, not to this gate.

In eval mode the batch norm is a per-channel affine map ``a ⊙ x + d``, so ``GAP(BN(x)) = a ⊙ GAP(x) + d`` and
``y = x ⊙ (a g) + d g`` (g the gate): the forward reads the input twice (pooling, output) and forms no normalised
copy. In training mode the batch statistics come from ``BatchNorm2d`` itself (running averages updated as usual).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_channels, check_nchw, get_act, mean_expanded_grad, needs_grad
from ..registry import register

__all__ = ['SkipSqueezeExcite']


@register(
    'parnet', paper='Non-deep Networks', arxiv='2110.07641', year=2021, family='channel', complexity='O(N·C + C²)',
)
class SkipSqueezeExcite(nn.Module):
    """ParNet's Skip-Squeeze-Excitation: batch norm, then an SE gate without reduction on the normalised input.

    Args:
        channels: input and output channels C.
        bias: bias in the 1×1 conv of the gate (default False, as the released code).
        gate_layer: gating activation (default sigmoid).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
            self,
            channels: int,
            *,
            bias: bool = False,
            gate_layer: type[nn.Module] | str = nn.Sigmoid,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.bn = nn.BatchNorm2d(channels, **dd)
        self.conv = nn.Conv2d(channels, channels, 1, bias=bias, **dd)
        self.gate = get_act(gate_layer)

    def _excite(self, s: Tensor) -> Tensor:
        """The gate σ(W s + b) of pooled features s: [B, C] -> [B, C]."""
        g = torch.matmul(s, self.conv.weight.flatten(1).to(s.dtype).t())
        b = self.conv.bias
        if b is not None:
            g = g + b.to(s.dtype)
        return self.gate(g)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'SkipSqueezeExcite')
        ct = torch.promote_types(x.dtype, torch.float32)
        mean, var = self.bn.running_mean, self.bn.running_var
        if self.training or mean is None or var is None:
            y = self.bn(x)
            g = self._excite(mean_expanded_grad(y, [2, 3]).to(ct))
            return y * g.to(x.dtype)[:, :, None, None]
        # eval: BN(x) = a ⊙ x + d per channel, folded into the pooling and the output
        w, b = self.bn.weight, self.bn.bias
        a = torch.rsqrt(var.to(ct) + self.bn.eps)
        if w is not None:
            a = a * w.to(ct)
        d = -mean.to(ct) * a
        if b is not None:
            d = d + b.to(ct)
        g = self._excite(mean_expanded_grad(x, [2, 3]).to(ct) * a + d)  # [B, C]
        scale = (a * g).to(x.dtype)[:, :, None, None]
        shift = (d * g).to(x.dtype)[:, :, None, None]
        if needs_grad([x, scale]):
            return torch.addcmul(shift, x, scale)
        return torch.mul(x, scale).add_(shift)
