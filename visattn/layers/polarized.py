"""Polarized Self-Attention (PSA).

Paper: "Polarized Self-Attention: Towards High-quality Pixel-wise Regression", Huajun Liu, Fuqiang Liu, Xinyi Fan,
Dong Huang, arXiv 2021, arXiv:2107.00782 (https://arxiv.org/abs/2107.00782).

Two branches, each keeping the full resolution along one axis and collapsing the other (C/2 = ``rd_channels``):

- channel-only: ``A_ch(X) = σ(LN(W_z((W_v X) · softmax_HW(W_q X))))`` with ``W_q`` a 1×1 conv C → 1 (one map,
  softmax over the H·W positions), ``W_v`` C → C/2, their product a [C/2, 1, 1] vector, ``W_z`` C/2 → C, a layer
  norm over the C channels and a sigmoid: ``A_ch ∈ [C, 1, 1]``;
- spatial-only: ``A_sp(X) = σ(softmax_C/2(GAP(W_q' X)) · (W_v' X))`` with ``W_q'``, ``W_v'`` 1×1 convs C → C/2,
  global average pooling of the query, a softmax over its C/2 channels, and their product a [1, H, W] map.

Layouts: parallel ``PSA_p(X) = A_ch(X) ⊙_ch X + A_sp(X) ⊙_sp X`` (default) and sequential
``PSA_s(X) = A_sp(Y) ⊙_sp Y`` with ``Y = A_ch(X) ⊙_ch X``.

The paper's equations are followed. The released code (DeLightCMU/PSA, ``semantic-segmentation/network/PSA.py``)
departs from them: its parallel ``PSA_p`` has no layer norm and takes the spatial softmax over the H·W positions of
the product instead of over the C/2 channels of the pooled query; its sequential ``PSA_s`` replaces ``W_z`` by a
GC-style bottleneck (C/2 → C/8, LayerNorm, ReLU, → C) and takes the softmax over positions of ``W_v' X``. Taken from
the released code where the paper is silent: no biases in the 1×1 convs (``bias=False``, an option), Kaiming-normal
(fan-in) initialisation of the four query/value convs, PyTorch's default for ``W_z``.

Every map enters linearly, so the forward reassociates the products without changing the function:
``(W_v X) · p = W_v (X · p)`` (``p`` sums to one, so ``W_v``'s bias passes through), ``GAP(W_q' X) = W_q' GAP(X)``
and ``σ · (W_v' X) = (W_v'ᵀ σ) · X + σ · b_v'``: no C/2-channel map is ever formed, the block reads the input three
times (query logits, the two poolings in one product, the spatial logits) and writes the output once.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_channels, check_nchw, needs_grad, reduced_channels
from ..registry import register

__all__ = ['PolarizedSelfAttn']

LAYOUTS = ('parallel', 'sequential')


@register(
    'polarized', paper='Polarized Self-Attention: Towards High-quality Pixel-wise Regression', arxiv='2107.00782',
    year=2021, family='spatial', complexity='O(N·C)',
)
class PolarizedSelfAttn(nn.Module):
    """Polarized self-attention block (channel-only and spatial-only branches).

    Args:
        channels: input and output channels C.
        layout: ``'parallel'`` (default, ``PSA_p``) or ``'sequential'`` (``PSA_s``).
        rd_ratio, rd_channels, rd_divisor: internal width of both branches (default C/2, as the paper).
        bias: biases in the 1×1 convs (default False, as the released code).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
            self,
            channels: int,
            *,
            layout: str = 'parallel',
            rd_ratio: float = 1 / 2,
            rd_channels: int | None = None,
            rd_divisor: int = 1,
            bias: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be 'parallel' or 'sequential', got {layout!r}")
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.layout = layout
        self.sequential = layout == 'sequential'
        rd = self.rd_channels = reduced_channels(channels, rd_ratio, rd_channels, rd_divisor)
        self.ch_wq = nn.Conv2d(channels, 1, 1, bias=bias, **dd)
        self.ch_wv = nn.Conv2d(channels, rd, 1, bias=bias, **dd)
        self.ch_wz = nn.Conv2d(rd, channels, 1, bias=bias, **dd)
        self.ch_norm = nn.LayerNorm(channels, **dd)
        self.sp_wq = nn.Conv2d(channels, rd, 1, bias=bias, **dd)
        self.sp_wv = nn.Conv2d(channels, rd, 1, bias=bias, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan-in) query and value convs with zero biases, as the released code; default W_z, LN."""
        for conv in (self.ch_wq, self.ch_wv, self.sp_wq, self.sp_wv):
            nn.init.kaiming_normal_(conv.weight, mode='fan_in', nonlinearity='relu')
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        self.ch_wz.reset_parameters()
        self.ch_norm.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'PolarizedSelfAttn')
        B, C, H, W = x.shape
        ct = torch.promote_types(x.dtype, torch.float32)
        flat = x.flatten(2)  # [B, C, N]

        # channel-only branch: one query map, softmax over the N positions
        q = torch.matmul(self.ch_wq.weight.flatten(1).to(x.dtype), flat).to(ct)  # [B, 1, N]
        b = self.ch_wq.bias
        if b is not None:  # it cancels in the softmax, but takes part (a zero gradient, as DDP wants)
            q = q + b.to(ct)[:, None]
        p = torch.softmax(q, dim=-1)
        # X·p and GAP(X) in one product: [B, C, 2]
        weights = torch.cat([p, torch.full_like(p, 1.0 / (H * W))], 1).to(x.dtype)
        both = torch.matmul(flat, weights.transpose(1, 2)).to(ct)
        pooled, mean = both[:, :, :1], both[:, :, 1]
        z = torch.matmul(self.ch_wv.weight.flatten(1).to(ct), pooled)  # W_v (X·p): [B, C/2, 1]
        b = self.ch_wv.bias
        if b is not None:
            z = z + b.to(ct)[:, None]
        c = torch.matmul(self.ch_wz.weight.flatten(1).to(ct), z).squeeze(-1)  # [B, C]
        b = self.ch_wz.bias
        if b is not None:
            c = c + b.to(ct)
        w, b = self.ch_norm.weight, self.ch_norm.bias
        c = F.layer_norm(c, (C,), None if w is None else w.to(ct), None if b is None else b.to(ct), self.ch_norm.eps)
        a_ch = torch.sigmoid(c)  # [B, C]

        if self.sequential:  # Y = A_ch ⊙ X: GAP(Y) = A_ch ⊙ GAP(X), and u·Y_n = (u ⊙ A_ch)·X_n below
            mean = mean * a_ch
        # spatial-only branch: softmax over the C/2 channels of the pooled query
        g = torch.matmul(mean, self.sp_wq.weight.flatten(1).to(ct).t())  # [B, C/2]
        b = self.sp_wq.bias
        if b is not None:
            g = g + b.to(ct)
        sigma = torch.softmax(g, dim=-1)
        u = torch.matmul(sigma, self.sp_wv.weight.flatten(1).to(ct))  # W_v'ᵀ σ: [B, C]
        if self.sequential:
            u = u * a_ch
        s = torch.matmul(u.to(x.dtype).unsqueeze(1), flat).to(ct)  # [B, 1, N]
        b = self.sp_wv.bias
        if b is not None:
            s = s + torch.matmul(sigma, b.to(ct))[:, None, None]
        a_sp = torch.sigmoid(s).to(x.dtype).view(B, 1, H, W)
        a_ch = a_ch.to(x.dtype).view(B, C, 1, 1)

        att = a_ch * a_sp if self.sequential else a_ch + a_sp  # [B, C, H, W]
        if needs_grad([x, att]):
            return x * att
        return att.mul_(x)
