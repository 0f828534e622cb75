"""Shuffle attention (SA).

Paper: "SA-Net: Shuffle Attention for Deep Convolutional Neural Networks", Zhang, Yang, ICASSP 2021,
arXiv:2102.00240 (https://arxiv.org/abs/2102.00240). Released code: https://github.com/wofmanaf/SA-Net
(``models/sa_resnet.py``, ``sa_layer``).

The C channels are split into G groups, and each group into two halves of c = C/(2G) channels. On the first half
``x_k1`` a channel branch, on the second ``x_k2`` a spatial branch (per channel j of the half):

    channel:  x'_k1 = x_k1 · σ(W1_j · GAP(x_k1)_j + b1_j)
    spatial:  x'_k2 = x_k2 · σ(W2_j · GN(x_k2)_j + b2_j)

where GN normalises each channel over H×W (a group norm with one channel per group, affine, ε = 1e-5) and the
parameters ``W1, b1, W2, b2`` ([1, c, 1, 1], the released code's ``cweight, cbias, sweight, sbias``) are shared by
the G groups. The halves are concatenated back in place and the C channels shuffled with 2 groups (channel
``i·C/2 + m`` moves to ``2m + i``), as ShuffleNet's channel shuffle.

Defaults and initialisation follow the released code: G = 64, ``cweight = sweight = 0`` and ``cbias = sbias = 1``
(the block starts as ``x · σ(1)``, shuffled), the group norm's affine weight 1 and bias 0. Parameter names are the
released module's, so its state dict loads as it is.

Both branches are an affine map of the channel's normalised values inside the sigmoid: ``(W2 γ) x̂ + (W2 β + b2)`` on
spatial halves, ``0 · x̂ + (W1 GAP + b1)`` on channel halves. So one group norm over the [1, B·C, H, W] view (one
group per image and channel) with these per-image weights and biases gives every logit in one fused pass, after the
mean of the channel halves; the gate's product writes the shuffled order directly in inference (under autograd the
shuffle is one copy).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_channels, check_float, check_int, check_nchw, is_compiling, needs_grad
from ..registry import register


def _vec(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A [1, c, 1, 1] (or [c]) parameter as a [c] vector in the compute dtype."""
    return t.reshape(-1).to(dtype)


def default_groups(channels: int, maximum: int = 64) -> int:
    """The default G: ``maximum`` (the paper's 64) where it divides C/2, else the largest divisor of C/2 below it."""
    half = channels // 2
    return max(g for g in range(1, min(maximum, half) + 1) if half % g == 0) if half else 1


@register(
    'shuffle', paper='SA-Net: Shuffle Attention for Deep Convolutional Neural Networks', arxiv='2102.00240',
    year=2021, family='spatial', complexity='O(N·C)',
)
class ShuffleAttn(nn.Module):
    """Shuffle attention block.

    Args:
        channels: input and output channels C, even.
        groups: G, the number of groups; must divide C/2. Default: 64 (the paper's and the released code's) where 64
            divides C/2, else the largest divisor of C/2 below 64 (e.g. 32 for C = 64), so that the block fits any
            even width; a given value is used as it is.
        eps: ε of the spatial branch's group norm, > 0 (default 1e-5).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
            self,
            channels: int,
            *,
            groups: int | None = None,
            eps: float = 1e-5,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        if channels % 2:
            raise ValueError(f'ShuffleAttn splits every group in two halves: channels must be even, got {channels}')
        if groups is None:
            groups = default_groups(channels)
        check_int('groups', groups)
        if (channels // 2) % groups:
            raise ValueError(f'groups must divide channels / 2 = {channels // 2} (channels={channels}), '
                             f'got groups={groups}')
        self.groups = groups
        self.eps = check_float('eps', eps, 0., None, low_open=True)
        c = self.half_channels = channels // (2 * groups)
        self.cweight = nn.Parameter(torch.empty(1, c, 1, 1, **dd))
        self.cbias = nn.Parameter(torch.empty(1, c, 1, 1, **dd))
        self.sweight = nn.Parameter(torch.empty(1, c, 1, 1, **dd))
        self.sbias = nn.Parameter(torch.empty(1, c, 1, 1, **dd))
        self.gn = nn.GroupNorm(c, c, eps=eps, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The released code's initialisation: scales 0, shifts 1; the group norm's affine at identity."""
        nn.init.zeros_(self.cweight)
        nn.init.ones_(self.cbias)
        nn.init.zeros_(self.sweight)
        nn.init.ones_(self.sbias)
        self.gn.reset_parameters()

    def extra_repr(self) -> str:
        return f'{self.channels}, groups={self.groups}'

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'ShuffleAttn')
        B, C, H, W = x.shape
        if B == 0:  # (F.group_norm needs a group)
            return x.clone()
        G, c = self.groups, self.half_channels
        ct = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(ct)
        # channel halves: the logit W1 · GAP + b1 (a constant per image and channel)
        mean = xf.reshape(B, G, 2, c, H * W)[:, :, 0].sum(-1) / (H * W)  # [B, G, c]
        w1, b1 = _vec(self.cweight, ct), _vec(self.cbias, ct)
        w2, b2 = _vec(self.sweight, ct), _vec(self.sbias, ct)
        # spatial halves: the logit W2 (γ x̂ + β) + b2 = (W2 γ) x̂ + (W2 β + b2), x̂ normalised per channel
        ws, bs = w2 * _vec(self.gn.weight, ct), w2 * _vec(self.gn.bias, ct) + b2
        weight = torch.stack([torch.zeros_like(mean), ws.expand_as(mean)], 2)  # [B, G, 2, c]
        bias = torch.stack([torch.addcmul(b1, w1, mean), bs.expand_as(mean)], 2)
        # every logit as one group norm of the [1, B·C, H, W] view (one group per image and channel), fused with
        # its per-image affine map: the statistics and the logits in one pass
        if H * W == 1:  # one position: x̂ = 0 (and F.group_norm refuses groups of one value)
            gate = torch.sigmoid(weight * 0.0 + bias)  # the weights' gradient: x̂ = 0
        else:  # in place: group_norm's backward needs no output
            gate = F.group_norm(xf.reshape(1, B * C, H, W), B * C, weight.reshape(-1), bias.reshape(-1),
                                self.eps).sigmoid_()
        gate = gate.reshape(B, 2, C // 2, H, W).transpose(1, 2)
        xs = xf.reshape(B, 2, C // 2, H, W).transpose(1, 2)  # the shuffle: channel i·C/2 + m goes to 2m + i
        if not torch.jit.is_scripting() and not is_compiling() and not needs_grad([x, gate]):
            return torch.mul(gate, xs, out=torch.empty(B, C // 2, 2, H, W, dtype=ct, device=x.device)).view(
                B, C, H, W).to(x.dtype)
        return (gate * xs).reshape(B, C, H, W).to(x.dtype)
