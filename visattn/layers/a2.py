"""Double attention block (A²-Nets).

Paper: "A²-Nets: Double Attention Networks", Chen, Kalantidis, Li, Yan, Feng, NeurIPS 2018, arXiv:1810.11579
(https://arxiv.org/abs/1810.11579).

Three 1×1 convs of the input X [C, N] (N = H·W positions): ``A = φ(X)`` [c_m, N] (features),
``B = softmax_N(θ(X))`` [c_n, N] (c_n attention maps, each a softmax over the positions) and
``V = softmax_cn(ρ(X))`` [c_n, N] (an attention vector over the c_n maps at every position). Two steps:

- gather: ``G = A Bᵀ`` [c_m, c_n], c_n global descriptors by second-order attention pooling;
- distribute: ``Z = G V`` [c_m, N], each position a mixture of the descriptors.

A 1×1 conv ``W_out`` takes Z back to C channels and the result is added to the input, ``Y = X + W_out Z``, as the
paper. ``c_m = c_n = C/4`` by default (the setting of the paper's ablation studies); ``norm=True`` puts a batch norm
after ``W_out``, its weight starting at zero so that the block starts as the identity (as the non-local block's).

The products are reassociated without changing the function: ``G = W_φ (X Bᵀ) + b_φ 𝟙ᵀ`` (each map of B sums to one),
and ``W_out G V + b_out = (W_out G + b_out 𝟙ᵀ) V`` (each column of V sums to one), so φ(X) and Z are never formed:
the block reads the input twice (θ and ρ in one product, then X Bᵀ) and writes the output once, adding the residual
in the same product. In eval mode the batch norm is folded into that product too.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_channels, check_int, check_nchw
from ..registry import register

__all__ = ['DoubleAttention']


@register(
    'a2', paper='A^2-Nets: Double Attention Networks', arxiv='1810.11579', year=2018, family='context',
    complexity='O(N·C·(c_m + c_n))',
)
class DoubleAttention(nn.Module):
    """Double attention block (gather, distribute) with a residual connection.

    Args:
        channels: input and output channels C.
        c_m: channels of the features A = φ(X) (default C/4, at least 1).
        c_n: number of attention maps of B = softmax(θ(X)) and of V = softmax(ρ(X)) (default C/4, at least 1).
        norm: a batch norm after the output conv, starting at zero scale (default False: the paper adds the conv's
            output to the input directly).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W]. Memory O(N·(C + c_n)); no N×N matrix.
    """

    def __init__(
            self,
            channels: int,
            *,
            c_m: int | None = None,
            c_n: int | None = None,
            norm: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.c_m = check_int('c_m', max(1, channels // 4) if c_m is None else c_m)
        self.c_n = check_int('c_n', max(1, channels // 4) if c_n is None else c_n)
        self.phi = nn.Conv2d(channels, self.c_m, 1, **dd)
        self.theta = nn.Conv2d(channels, self.c_n, 1, **dd)
        self.rho = nn.Conv2d(channels, self.c_n, 1, **dd)
        self.out = nn.Conv2d(self.c_m, channels, 1, **dd)
        self.norm = nn.BatchNorm2d(channels, **dd) if norm else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default conv initialisation; with ``norm``, zero scale and shift so that the block starts as identity."""
        for conv in (self.phi, self.theta, self.rho, self.out):
            conv.reset_parameters()
        if self.norm is not None:
            self.norm.reset_running_stats()
            nn.init.zeros_(self.norm.weight)
            nn.init.zeros_(self.norm.bias)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'DoubleAttention')
        ct = torch.promote_types(x.dtype, torch.float32)
        flat = x.flatten(2)  # [B, C, N]
        cn = self.c_n
        # θ(X) and ρ(X) in one product: [B, 2·c_n, N]
        w = torch.cat([self.theta.weight, self.rho.weight]).flatten(1).to(x.dtype)
        logits = torch.matmul(w, flat).to(ct)
        b1, b2 = self.theta.bias, self.rho.bias
        if b1 is not None and b2 is not None:
            logits = logits + torch.cat([b1, b2]).to(ct)[:, None]
        maps = torch.softmax(logits[:, :cn], dim=-1)  # B: each map over the N positions
        vectors = torch.softmax(logits[:, cn:], dim=1)  # V: each position over the c_n maps
        # gather: G = W_φ (X Bᵀ) + b_φ 𝟙ᵀ: [B, c_m, c_n]
        pooled = torch.matmul(flat, maps.to(x.dtype).transpose(1, 2)).to(ct)  # X Bᵀ: [B, C, c_n]
        g = torch.matmul(self.phi.weight.flatten(1).to(ct), pooled)
        b = self.phi.bias
        if b is not None:
            g = g + b.to(ct)[:, None]
        # distribute and project back: W_out G V + b_out = (W_out G + b_out 𝟙ᵀ) V
        m = torch.matmul(self.out.weight.flatten(1).to(ct), g)  # [B, C, c_n]
        b = self.out.bias
        if b is not None:
            m = m + b.to(ct)[:, None]
        if self.norm is None:
            return torch.baddbmm(flat, m.to(x.dtype), vectors.to(x.dtype)).view_as(x)
        mean, var = self.norm.running_mean, self.norm.running_var
        if self.training or mean is None or var is None:
            y = torch.matmul(m.to(x.dtype), vectors.to(x.dtype)).view_as(x)
            return x + self.norm(y)
        # eval: BN(y) = a ⊙ y + d, and d = d 𝟙ᵀ V as well
        a = torch.rsqrt(var.to(ct) + self.norm.eps) * self.norm.weight.to(ct)
        d = self.norm.bias.to(ct) - mean.to(ct) * a
        m = m * a[:, None] + d[:, None]
        return torch.baddbmm(flat, m.to(x.dtype), vectors.to(x.dtype)).view_as(x)
