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

from einops import rearrange
from torch import Tensor

from .._utils import QueryKeyValue2d, check_channels, check_nchw, reduced_channels
from ..ops import criss_cross_attention
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
        if isinstance(recurrence, bool) or not isinstance(recurrence, int) or recurrence < 1:
            raise ValueError(f'recurrence must be an int >= 1, got {recurrence!r}')
        super().__init__(
            channels, reduced_channels(check_channels(channels), rd_ratio, rd_channels, rd_divisor), device, dtype)
        self.recurrence = recurrence

    def attend(self, x: Tensor) -> Tensor:
        """The residual term of one criss-cross module, ``γ · CCA(x)``: [B, C, H, W]."""
        q, k, v = (rearrange(conv(x), 'b c h w -> b 1 h w c') for conv in (self.query, self.key, self.value))
        out = criss_cross_attention(q, k, v, scale=1.0)  # CCNet does not scale the scores
        return self.gamma * rearrange(out, 'b 1 h w c -> b c h w')

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, type(self).__name__)
        for _ in range(self.recurrence):
            x = x + self.attend(x)
        return x
