"""SimAM: a parameter-free 3-D attention from an energy function.

Paper: "SimAM: A Simple, Parameter-Free Attention Module for Convolutional Neural Networks", Yang, Zhang, Li, Xie,
ICML 2021, PMLR 139:11863-11874 (https://proceedings.mlr.press/v139/yang21o.html); no arXiv version. Released code:
https://github.com/ZjjConan/SimAM (``networks/attentions/simam_module.py``).

Each neuron ``t`` of a channel is scored by the minimal energy of separating it from the other neurons of its
channel. With the channel's mean ``μ`` and variance ``σ²`` shared by all its neurons, the inverse of the minimal
energy is (Eq. 5 and the released code)::

    1 / e*_t = (t − μ)² / (4 (σ² + λ)) + 0.5,      y = x · σ(1 / e*)

where ``μ = 1/M Σ_i x_i`` over the M = H·W positions and ``σ² = 1/n Σ_i (x_i − μ)²`` with ``n = M − 1`` (the M − 1
other neurons of the energy function), and λ = 1e-4 (the released module's default). The result is a gate per
position and channel, and the block has no parameters. Note that the released ImageNet recipes train with
``--attention_param 0.1``, i.e. λ = 0.1: pass ``e_lambda=0.1`` for those.

A 1×1 map has no other neuron (n = 0, where the released code divides 0 by 0): there ``t = μ`` and the sum is empty,
so σ² is taken as 0, ``1/e* = 0.5`` and ``y = x · σ(0.5)``; the gradient is that of this constant gate.

Computation: with the biased variance ``v = 1/M Σ (x_i − μ)²`` (so σ² = M·v / (M − 1)),
``(t − μ)² / (4 (σ² + λ)) = (M − 1)/(4M) · t̂²`` for ``t̂ = (t − μ) / sqrt(v + λ (M − 1)/M)``, which is a layer norm
over (H, W) with ε = λ (M − 1)/M. One fused normalisation pass thus gives the statistics and t̂ (a separate mean and
variance pass is slower on a CPU), then ``y = x · σ((M − 1)/(4M) · t̂² + 0.5)`` in three more.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_channels, check_float, check_nchw, needs_grad
from ..registry import register


@register(
    'simam', paper='SimAM: A Simple, Parameter-Free Attention Module for Convolutional Neural Networks', arxiv='',
    paper_url='https://proceedings.mlr.press/v139/yang21o.html', year=2021, family='spatial', complexity='O(N·C)',
)
class SimAM(nn.Module):
    """SimAM block (no parameters).

    Args:
        channels: input and output channels C (checked against the input; SimAM itself needs no width).
        e_lambda: the regulariser λ of the energy function, > 0 (default 1e-4, the released module's default;
            the released ImageNet recipes use 0.1).
        device, dtype: factory arguments (accepted for the common interface; the block owns no tensors).

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(self, channels: int, *, e_lambda: float = 1e-4, device=None, dtype=None) -> None:
        super().__init__()
        self.channels = check_channels(channels)
        self.e_lambda = check_float('e_lambda', e_lambda, 0., None, low_open=True)

    def extra_repr(self) -> str:
        return f'{self.channels}, e_lambda={self.e_lambda:g}'

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'SimAM')
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        H, W = x.shape[2], x.shape[3]
        m = H * W
        if m == 1:  # no other neuron: the gate is σ(0.5)
            return (xf * torch.sigmoid(xf.new_full([], 0.5))).to(x.dtype)
        t = F.layer_norm(xf, [H, W], eps=self.e_lambda * (m - 1) / m)  # t̂ (module docstring)
        e = torch.addcmul(t.new_full([], 0.5), t, t, value=(m - 1) / (4 * m))  # 1 / e*
        if not torch.jit.is_scripting() and not needs_grad([x]):
            y = e.sigmoid_().mul_(xf)  # e is a fresh map: updated in place
        else:
            y = xf * e.sigmoid_()  # addcmul's backward does not need e
        return y.to(x.dtype)
