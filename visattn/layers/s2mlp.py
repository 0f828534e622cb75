"""Spatial-shift MLP token mixers (S²-MLP and S²-MLPv2).

Papers: "S²-MLP: Spatial-Shift MLP Architecture for Vision", Yu, Li, Cai, Sun, Li, WACV 2022, arXiv:2106.07477
(https://arxiv.org/abs/2106.07477); "S²-MLPv2: Improved Spatial-Shift MLP Architecture for Vision", Yu, Li, Cai,
Sun, Li, 2021, arXiv:2108.01072 (https://arxiv.org/abs/2108.01072).

The spatial shift (S²-MLP, Sec. 3): the C channels are split into four groups (at ⌊C/4⌋, ⌊C/2⌋, ⌊3C/4⌋, as the
paper's ``c/4`` slices) that move by one pixel, each in its own direction. With the paper's tensor
X ∈ R^{w × h × c}, whose first index runs along the width,

    S1:  X1[1:w] ← X1[0:w-1],  X2[0:w-1] ← X2[1:w]  (along W),  X3[:, 1:h] ← X3[:, 0:h-1],  X4[:, 0:h-1] ← X4[:, 1:h]
    (along H), i.e. y[c, i, j] = x[c, i, j - 1], x[c, i, j + 1], x[c, i - 1, j], x[c, i + 1, j] for the four groups;

the assignments are in place, so the first (last) row or column, which no pixel moves into, keeps its own value
(not 0). S²-MLPv2's second shift ``S2`` moves the first two groups along H and the last two along W.
(Implementations that permute NCHW to [B, H, W, C] and name those axes (w, h) move the first two groups along H
in ``S1``: the same function up to a permutation of ``fc1``'s output and ``fc2``'s input channels.)

``version=1``, S²-MLP's token-mixing part of the spatial-shift block (Fig. 1: fully-connected, GELU, spatial
shift, fully-connected; with the channel MLP, four FC layers and two GELUs a block, as the paper counts)::

    y = FC2(S1(GELU(FC1(x)))),        FC1, FC2: C → C with bias (1×1 convolutions on the map).

``version=2``, S²-MLPv2's (Sec. 3): FC1 expands C → 3C, the three parts X1, X2, X3 get ``S1``, ``S2`` and no
shift, and split attention fuses them, then FC2 (C → C)::

    a = Σ_k Σ_n X_k[n] ∈ R^C,   â = GELU(a W1) W2 ∈ R^{3C} -> [3, C],   ā = softmax over k,
    y = FC2(Σ_k ā_k ⊙ X_k),        W1: C × C, W2: C × 3C, without bias (the paper's split attention).

The paper sums over the n = H·W positions; ``attn_pool='mean'`` divides by H·W instead (a size-independent gate).
The softmax runs in at least float32. The papers wrap each part as ``x + part(LN(x))``: the norm and the residual
are the network's, not this block's. One class for both versions (registered as ``s2mlp``, ``version=2`` for
S²-MLPv2): they fill the same slot with the same interface, and v2 is the paper's drop-in replacement for v1's
token-mixing part. Any H × W: nothing depends on the size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_channels, check_int, check_nchw, get_act, shift_channel_groups
from ..registry import register

__all__ = ['SpatialShiftMlp', 'spatial_shift']

# (dy, dx) of the four channel groups: S1 (S²-MLP) and S2 (S²-MLPv2's second branch)
SHIFT1 = [(0, 1), (0, -1), (1, 0), (-1, 0)]
SHIFT2 = [(1, 0), (-1, 0), (0, 1), (0, -1)]


def _quarters(channels: int, offset: int = 0) -> list[int]:
    return [offset + channels * q // 4 for q in range(5)]


def spatial_shift(x: Tensor, version: int = 1, channels_last: bool = False) -> Tensor:
    """The spatial shift ``S1`` (``version=1``) or ``S2`` (``version=2``) of ``x`` [B, C, H, W] (or [B, H, W, C]
    with ``channels_last``): four channel groups one pixel each way, the uncovered border keeping its value."""
    C = x.shape[3] if channels_last else x.shape[1]
    return shift_channel_groups(x, _quarters(C), SHIFT1 if version == 1 else SHIFT2, keep_border=True,
                                channels_last=channels_last)


@register(
    's2mlp', paper='S2-MLP: Spatial-Shift MLP Architecture for Vision', arxiv='2106.07477', year=2022,
    family='token-mixing', complexity='O(N·C²)',
)
class SpatialShiftMlp(nn.Module):
    """S²-MLP's (``version=1``) or S²-MLPv2's (``version=2``) spatial-shift token mixer.

    Args:
        channels: input and output channels C.
        version: 1 (S²-MLP: FC, GELU, shift, FC; default) or 2 (S²-MLPv2: FC to 3C, two shifts and an identity
            branch fused by split attention, FC).
        act_layer: activation after FC1 in version 1, and in the split attention's MLP in version 2 (GELU).
        attn_pool: version 2's pooling of the split attention: ``'sum'`` over the positions (the paper's) or
            ``'mean'``.
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W], any H and W.
    """

    def __init__(
            self,
            channels: int,
            *,
            version: int = 1,
            act_layer: type[nn.Module] | str = nn.GELU,
            attn_pool: str = 'sum',
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = C = check_channels(channels)
        self.version = check_int('version', version, 1, 2)
        if attn_pool not in ('sum', 'mean'):
            raise ValueError(f"attn_pool must be 'sum' or 'mean', got {attn_pool!r}")
        self.attn_pool = attn_pool
        self.act = get_act(act_layer)
        if version == 1:
            self.fc1 = nn.Conv2d(C, C, 1, **dd)
            self.attn_fc1, self.attn_fc2 = nn.Identity(), nn.Identity()  # unused (version 2's split attention)
            self.bounds, self.offsets = _quarters(C), SHIFT1
        else:
            self.fc1 = nn.Conv2d(C, 3 * C, 1, **dd)
            self.attn_fc1 = nn.Linear(C, C, bias=False, **dd)
            self.attn_fc2 = nn.Linear(C, 3 * C, bias=False, **dd)
            # one shift over the expanded map: S1 on X1, S2 on X2, X3 copied
            self.bounds, self.offsets = _quarters(C) + _quarters(C, C)[1:], SHIFT1 + SHIFT2
        self.fc2 = nn.Conv2d(C, C, 1, **dd)

    def split_attention(self, xs: Tensor) -> Tensor:
        """S²-MLPv2's split attention of the three branches ``xs`` [B, 3, C, H, W] -> [B, C, H, W]."""
        dt = torch.promote_types(xs.dtype, torch.float32)
        a = xs.sum([1, 3, 4], dtype=dt)
        if self.attn_pool == 'mean':
            a = a / (xs.shape[3] * xs.shape[4])
        a = self.attn_fc2(self.act(self.attn_fc1(a.to(xs.dtype))))  # [B, 3C]
        w = torch.softmax(a.view(-1, 3, self.channels).to(dt), dim=1).to(xs.dtype)  # [B, 3, C]
        return torch.einsum('bkc,bkchw->bchw', w, xs)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'SpatialShiftMlp')
        if self.version == 1:
            return self.fc2(shift_channel_groups(self.act(self.fc1(x)), self.bounds, self.offsets, keep_border=True))
        B, _, H, W = x.shape
        xs = shift_channel_groups(self.fc1(x), self.bounds, self.offsets, keep_border=True)  # [B, 3C, H, W]
        return self.fc2(self.split_attention(xs.view(B, 3, self.channels, H, W)))
