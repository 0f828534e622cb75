"""Non-local block, embedded Gaussian.

Paper: "Non-local Neural Networks", Wang, Girshick, Gupta, He, CVPR 2018, arXiv:1711.07971
(https://arxiv.org/abs/1711.07971).

``y_i = Σ_j softmax_j(θ(x_i)ᵀ φ(x_j)) g(x_j)`` with θ, φ, g 1×1 convs to C/2 channels (the bottleneck of the
paper), then ``z = BN(W_z y) + x``: the batch norm after W_z starts with zero scale, so that the block starts as
the identity, as the paper initialises it. The paper's subsampling trick (a 2×2 max pool after φ and g, which
cuts the pairwise cost by 4) is the ``sub_sample`` option. The attention runs in ``scaled_dot_product_attention``
(θ, φ and g have the same width, so its fused kernels apply, accumulating in float32): O((HW)²·C) time, memory
O(HW·C) where a fused kernel runs (flash attention on CPU and GPU), (HW)² where PyTorch falls back to its plain path.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_channels, check_nchw, reduced_channels
from ..registry import register

__all__ = ['NonLocal']


@register(
    'nl', paper='Non-local Neural Networks', arxiv='1711.07971', year=2017, family='context',
    complexity='O(N²·C)',
)
class NonLocal(nn.Module):
    """Non-local block (embedded Gaussian) with a residual connection.

    Args:
        channels: input and output channels C.
        rd_ratio, rd_channels, rd_divisor: width of θ, φ and g (default C/2, as the paper).
        sub_sample: 2×2 max pooling after φ and g (default False); odd sizes are pooled with ``ceil_mode``.
        scaled: divide the scores by sqrt(C/2), as some later releases do (default False: the paper has no scale).
        norm_layer: normalisation after W_z, whose weight starts at zero (default BatchNorm2d); ``None`` zeroes
            W_z itself instead.
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
            self,
            channels: int,
            *,
            rd_ratio: float = 1 / 2,
            rd_channels: int | None = None,
            rd_divisor: int = 1,
            sub_sample: bool = False,
            scaled: bool = False,
            norm_layer: type[nn.Module] | None = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.rd_channels = reduced_channels(channels, rd_ratio, rd_channels, rd_divisor)
        self.sub_sample = sub_sample
        self.scale = self.rd_channels ** -0.5 if scaled else 1.0
        self.theta = nn.Conv2d(channels, self.rd_channels, 1, **dd)
        self.phi = nn.Conv2d(channels, self.rd_channels, 1, **dd)
        self.g = nn.Conv2d(channels, self.rd_channels, 1, **dd)
        self.out = nn.Conv2d(self.rd_channels, channels, 1, **dd)
        self.norm = norm_layer(channels, **dd) if norm_layer is not None else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default conv initialisation; zero scale of the output norm (or zero W_z): the block starts as identity."""
        for conv in (self.theta, self.phi, self.g, self.out):
            conv.reset_parameters()
        if isinstance(self.norm, nn.Identity):
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
        else:
            nn.init.zeros_(self.norm.weight)
            nn.init.zeros_(self.norm.bias)

    def _pool(self, x: Tensor) -> Tensor:
        if not self.sub_sample:
            return x
        return F.max_pool2d(x, (min(2, x.shape[-2]), min(2, x.shape[-1])), ceil_mode=True)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'NonLocal')
        height, width = x.shape[-2:]
        # [B, 1, HW (or M), C/2], contiguous in C/2 as the fused kernels need
        theta = self.theta(x).flatten(2).transpose(1, 2).unsqueeze(1).contiguous()
        phi = self._pool(self.phi(x)).flatten(2).transpose(1, 2).unsqueeze(1).contiguous()
        g = self._pool(self.g(x)).flatten(2).transpose(1, 2).unsqueeze(1).contiguous()
        y = F.scaled_dot_product_attention(theta, phi, g, scale=self.scale)  # softmax_j(θ_iᵀ φ_j) g_j: [B, 1, HW, C/2]
        y = y.squeeze(1).transpose(1, 2).reshape(x.shape[0], self.rd_channels, height, width)
        return x + self.norm(self.out(y))
