"""Shift token mixer (ShiftViT).

Paper: "When Shift Operation Meets Vision Transformer: An Extremely Simple Alternative to Attention Mechanism",
Wang, Zhao, Tang, Luo, Zeng, AAAI 2022, arXiv:2201.10801 (https://arxiv.org/abs/2201.10801).

ShiftViT replaces the attention layer of a Swin-like network with a shift of a few channels to the neighbouring
pixels: zero parameters and zero FLOPs. With ``g = ⌊C · shift_div⌋`` channels per direction and ``s = step``,

    y[c, i, j] = x[c, i, j + s]    for c ∈ [0, g)        (shift left)
    y[c, i, j] = x[c, i, j - s]    for c ∈ [g, 2g)       (shift right)
    y[c, i, j] = x[c, i + s, j]    for c ∈ [2g, 3g)      (shift up)
    y[c, i, j] = x[c, i - s, j]    for c ∈ [3g, 4g)      (shift down)
    y[c, i, j] = x[c, i, j]        for c ∈ [4g, C)

with 0 where the source pixel is outside the map. ``shift_div = 1/12`` per direction (a third of the channels move)
and ``step = 1`` are the released code's (microsoft/SPACH ``shiftvit.py``: ``n_div=12``, ``g = C // n_div``, the
group order left, right, up, down). The output is written in one pass (see ``visattn._utils.shift_channel_groups``).
"""

from __future__ import annotations

import math

import torch.nn as nn
from torch import Tensor

from .._utils import check_channels, check_float, check_int, check_nchw, shift_channel_groups
from ..registry import register

__all__ = ['ShiftMixer', 'shift_mix']


def shift_mix(x: Tensor, group: int, step: int = 1, channels_last: bool = False) -> Tensor:
    """ShiftViT's shift of ``x`` [B, C, H, W] (or [B, H, W, C] with ``channels_last``): ``group`` channels each
    left, right, up and down by ``step`` pixels, zero filling; the other channels unchanged."""
    return shift_channel_groups(
        x, [0, group, 2 * group, 3 * group, 4 * group], [(0, -step), (0, step), (-step, 0), (step, 0)],
        channels_last=channels_last)


@register(
    'shift', paper='When Shift Operation Meets Vision Transformer: An Extremely Simple Alternative to Attention '
    'Mechanism', arxiv='2201.10801', year=2022, family='token-mixing', complexity='O(N·C)',
)
class ShiftMixer(nn.Module):
    """ShiftViT's shift operation.

    Args:
        channels: input and output channels C.
        shift_div: fraction of the channels shifted in each of the four directions, in (0, 1/4]
            (default 1/12); ``⌊C · shift_div⌋`` must be at least 1.
        step: shift in pixels (default 1).
        device, dtype: factory arguments (the block has no parameters).

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W], any H and W.
    """

    def __init__(self, channels: int, *, shift_div: float = 1 / 12, step: int = 1, device=None, dtype=None) -> None:
        super().__init__()
        self.channels = check_channels(channels)
        self.shift_div = check_float('shift_div', shift_div, 0., 0.25, low_open=True)
        self.step = check_int('step', step)
        self.group = math.floor(channels * self.shift_div + 1e-9)  # the released code's C // n_div for 1 / n_div
        if self.group < 1:
            raise ValueError(f'shift_div must leave at least one channel per direction: channels * shift_div >= 1, '
                             f'got channels = {channels}, shift_div = {shift_div!r}')

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'ShiftMixer')
        return shift_mix(x, self.group, self.step)
