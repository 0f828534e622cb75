"""Criss-Cross Attention (CCNet).

Paper: "CCNet: Criss-Cross Attention for Semantic Segmentation", Huang, Wang, Huang, Huang, Wei, Liu,
ICCV 2019, arXiv:1811.11721 (https://arxiv.org/abs/1811.11721).

Each position u attends to the positions of its column and its row, itself counted once (H + W - 1 keys),
in one softmax: ``A_u = softmax(Q_u · K_Ω(u))``, ``y_u = γ Σ_i A_{u,i} V_i + x_u``, with 1×1 convs for the
query and key (reduced to C/8) and the value (C channels), no scaling of the scores, and a learnable γ that
starts at 0. Applied R = 2 times with shared weights (recurrent criss-cross attention), every position gathers
context from the whole map. The attention itself is ``visattn.ops.criss_cross_attention`` (a Triton kernel on a
GPU, einsums on the CPU): the HW×HW matrix is never built, memory grows like HW·(H + W).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._utils import QueryKeyValue2d, check_channels, check_int, check_nchw, reduced_channels
from ..ops import criss_cross_attention
from ..ops.criss_cross.naive import criss_cross_attention_naive
from ..registry import register

__all__ = ['CrissCrossAttention']


@register(
    'cc', paper='CCNet: Criss-Cross Attention for Semantic Segmentation', arxiv='1811.11721', year=2018,
    family='context', complexity='O(N·(H+W)·C)', backends=('torch', 'triton'),
)
class CrissCrossAttention(QueryKeyValue2d):
    """Recurrent criss-cross attention (RCCA): the criss-cross module applied ``recurrence`` times, weights shared.

    Args:
        channels: input and output channels C.
        rd_ratio, rd_channels, rd_divisor: width of the query and key (default C/8, as the paper).
        recurrence: number of passes R (default 2, the paper's choice); R = 1 is one criss-cross module.
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
            self,
            channels: int,
            *,
            rd_ratio: float = 1 / 8,
            rd_channels: int | None = None,
            rd_divisor: int = 1,
            recurrence: int = 2,
            device=None,
            dtype=None,
    ) -> None:
        check_int('recurrence', recurrence)
        super().__init__(
            channels, reduced_channels(check_channels(channels), rd_ratio, rd_channels, rd_divisor), device, dtype)
        self.recurrence = recurrence

    def attend(self, x: Tensor) -> Tensor:
        """The residual term of one criss-cross module, ``γ · CCA(x)``: [B, C, H, W]."""
        q = self.query(x).permute(0, 2, 3, 1).unsqueeze(1)  # [B, 1, H, W, C/8]
        k = self.key(x).permute(0, 2, 3, 1).unsqueeze(1)
        v = self.value(x).permute(0, 2, 3, 1).unsqueeze(1)  # [B, 1, H, W, C]
        if torch.jit.is_scripting():
            out = criss_cross_attention_naive(q, k, v, scale=1.0)
        else:
            out = criss_cross_attention(q, k, v, scale=1.0)  # CCNet does not scale the scores
        return self.gamma * out.squeeze(1).permute(0, 3, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'CrissCrossAttention')
        for _ in range(self.recurrence):
            x = x + self.attend(x)
        return x
