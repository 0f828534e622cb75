"""Expectation-Maximization Attention (EMANet).

Paper: "Expectation-Maximization Attention Networks for Semantic Segmentation", Li, Zhong, Wu, Yang, Lin, Liu,
ICCV 2019, arXiv:1907.13426 (https://arxiv.org/abs/1907.13426).

A 1×1 conv maps the input to X [C, N]; K = 64 bases μ [C, K] run T = 3 EM iterations:
E-step ``Z = softmax_K(Xᵀ μ)`` (responsibilities [N, K]), M-step ``μ_k = Σ_n Z_nk X_n / Σ_n Z_nk``, then
l2 normalisation of each basis. The reconstruction ``X̃ = μ Zᵀ`` goes through ReLU, a 1×1 conv and batch norm,
and is added to the input before a final ReLU: ``y = ReLU(x + BN(W ReLU(μ Zᵀ)))``. Cost: O(N·K·C·T).

The initial bases are a buffer, not a parameter: in training they follow the batch-mean of the final bases by a
moving average, ``μ⁰ ← 0.9 μ⁰ + 0.1 normalise(mean_b μ^(T))``; under ``torch.distributed`` the mean runs over the
batches of every process (as mmsegmentation's EMA head), so the ranks' bases stay equal. As the released code
does, the EM iterations run without gradient (``em_grad=False``), so the first 1×1 conv receives none and is
never trained (mmsegmentation's EMA head freezes it): its weight and bias are then buffers, not parameters
(same state-dict keys), so every parameter of the block gets a gradient. ``em_grad=True`` back-propagates
through the iterations and trains it as a parameter.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_channels, check_float, check_int, check_nchw, softmax_fp32
from ..registry import register

__all__ = ['EMAttention']


def _l2_normalize(x: Tensor, dim: int) -> Tensor:
    return x / (1e-6 + torch.linalg.vector_norm(x, dim=dim, keepdim=True))


@register(
    'ema', paper='Expectation-Maximization Attention Networks for Semantic Segmentation', arxiv='1907.13426',
    year=2019, family='context', complexity='O(N·K·C)',
)
class EMAttention(nn.Module):
    """EMA unit (EMAU).

    Args:
        channels: input and output channels C.
        num_bases: number of bases K (default 64).
        num_iters: number of EM iterations T (default 3).
        momentum: weight of the old bases in their moving average (default 0.9).
        em_grad: back-propagate through the EM iterations (default False, as the released code).
        norm_layer: normalisation after the output conv (default BatchNorm2d).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
            self,
            channels: int,
            *,
            num_bases: int = 64,
            num_iters: int = 3,
            momentum: float = 0.9,
            em_grad: bool = False,
            norm_layer: type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        check_int('num_bases', num_bases)
        check_int('num_iters', num_iters)
        momentum = check_float('momentum', momentum, 0., 1.)
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.num_bases = num_bases
        self.num_iters = num_iters
        self.momentum = momentum
        self.em_grad = em_grad
        self.conv_in = nn.Conv2d(channels, channels, 1, **dd)
        self.conv_out = nn.Conv2d(channels, channels, 1, bias=False, **dd)
        self.norm = norm_layer(channels, **dd)
        self.register_buffer('bases', torch.empty(1, channels, num_bases, **dd))
        if not em_grad:  # no gradient can reach it: a fixed random projection, held as buffers
            for name in ('weight', 'bias'):
                self.conv_in.register_buffer(name, self.conv_in._parameters.pop(name).detach())
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As the released code: convs N(0, 2/(k²·C_out)), unit norm, bases N(0, 2/K) then l2-normalised."""
        for conv in (self.conv_in, self.conv_out):
            conv.reset_parameters()
            nn.init.kaiming_normal_(conv.weight, mode='fan_out', nonlinearity='relu')
        self.norm.reset_parameters()
        with torch.no_grad():
            self.bases.normal_(0.0, (2.0 / self.num_bases) ** 0.5)
            self.bases.copy_(_l2_normalize(self.bases, dim=1))

    def em(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The EM iterations on ``x: [B, C, N]``: final bases μ [B, C, K] and responsibilities Z [B, N, K]."""
        mu = self.bases.to(x.dtype).expand(x.shape[0], -1, -1)
        if torch.jit.is_scripting():
            return self._iterate(x, mu)
        with torch.set_grad_enabled(self.em_grad and torch.is_grad_enabled()):
            return self._iterate(x, mu)

    def _iterate(self, x: Tensor, mu: Tensor) -> tuple[Tensor, Tensor]:
        z = mu  # typed for TorchScript; num_iters >= 1 sets the responsibilities
        for _ in range(self.num_iters):
            z = softmax_fp32(torch.bmm(x.transpose(1, 2), mu), dim=2)  # E-step: [B, N, K]
            z_norm = z / (1e-6 + z.sum(dim=1, keepdim=True))
            mu = _l2_normalize(torch.bmm(x, z_norm), dim=1)  # M-step: [B, C, K]
        return mu, z

    @torch.jit.unused
    def _update_bases(self, mu: Tensor) -> None:
        """The moving average of the bases over the batch (and over every rank's batch, as mmseg's reduce_mean)."""
        with torch.no_grad():
            mean = mu.detach().mean(dim=0, keepdim=True)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(mean)
                mean = mean / dist.get_world_size()
            mean = _l2_normalize(mean, dim=1)
            self.bases.mul_(self.momentum).add_(mean.to(self.bases.dtype), alpha=1.0 - self.momentum)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'EMAttention')
        mu, z = self.em(self.conv_in(x).flatten(2))
        if self.training and not torch.jit.is_scripting():
            self._update_bases(mu)
        recon = F.relu(torch.bmm(mu, z.transpose(1, 2))).view_as(x)  # μ Zᵀ: [B, C, H, W]
        return F.relu(x + self.norm(self.conv_out(recon)))
