"""DANet dual attention: position attention and channel attention.

Paper: "Dual Attention Network for Scene Segmentation", Fu, Liu, Tian, Li, Bao, Fang, Lu, CVPR 2019,
arXiv:1809.02983 (https://arxiv.org/abs/1809.02983).

Position attention (PAM): ``s_ji = softmax_i(B_i · C_j)`` over all HW positions, with B and C 1×1 convs to C/8
and D a 1×1 conv to C channels, ``E_j = α Σ_i s_ji D_i + A_j`` (no scaling of the scores).
Channel attention (CAM): ``x_ji = softmax_i(A_i · A_j)`` over the C channels of the input itself (no convs),
``E_j = β Σ_i x_ji A_i + A_j``. α and β are learnable and start at 0.

The paper's equation (3) takes the softmax of ``A Aᵀ``; the released code takes it of ``max(A Aᵀ) - A Aᵀ``,
i.e. of ``-A Aᵀ`` (the row maximum cancels in the softmax). The paper is the default; ``channel_energy='code'``
gives the released code's variant.

The DANet head runs each branch behind its own convs and sums the two outputs. As one block without those convs,
``DualAttention`` adds both branches' attention terms to one copy of the input,
``y = x + α·PAM(x) + β·CAM(x)``, so that it starts as the identity.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import QueryKeyValue2d, check_channels, check_nchw, reduced_channels, softmax_fp32
from ..registry import register

__all__ = ['DAChannelAttention', 'DAPositionAttention', 'DualAttention']

_PAPER = 'Dual Attention Network for Scene Segmentation'
_ENERGIES = ('paper', 'code')


@register('da_position', paper=_PAPER, arxiv='1809.02983', year=2018, family='context', complexity='O(N²·C)')
class DAPositionAttention(QueryKeyValue2d):
    """DANet's position attention module: ``y = x + α · PAM(x)``.

    Args:
        channels: input and output channels C.
        rd_ratio, rd_channels, rd_divisor: width of the query and key (default C/8, as the paper).
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
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            channels, reduced_channels(check_channels(channels), rd_ratio, rd_channels, rd_divisor), device, dtype)

    def attend(self, x: Tensor) -> Tensor:
        """The attention term ``α · PAM(x)``: [B, C, H, W]."""
        q = self.query(x).flatten(2).transpose(1, 2)  # [B, HW, C/8]
        k = self.key(x).flatten(2)  # [B, C/8, HW]
        attn = softmax_fp32(torch.bmm(q, k), dim=-1)  # [B, HW (query j), HW (key i)]
        out = torch.bmm(self.value(x).flatten(2), attn.transpose(1, 2))  # [B, C, HW]
        return self.gamma * out.view_as(x)


@register('da_channel', paper=_PAPER, arxiv='1809.02983', year=2018, family='context', complexity='O(N·C²)')
class DAChannelAttention(nn.Module):
    """DANet's channel attention module: ``y = x + β · CAM(x)``.

    Args:
        channels: input and output channels C.
        energy: ``'paper'`` (softmax of ``A Aᵀ``, default) or ``'code'`` (softmax of ``max(A Aᵀ) - A Aᵀ``, as the
            released code).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(self, channels: int, *, energy: str = 'paper', device=None, dtype=None) -> None:
        super().__init__()
        if energy not in _ENERGIES:
            raise ValueError(f'energy must be one of {_ENERGIES}, got {energy!r}')
        self.channels = check_channels(channels)
        self.energy = energy
        self.gamma = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        """β = 0."""
        nn.init.zeros_(self.gamma)

    def attend(self, x: Tensor) -> Tensor:
        """The attention term ``β · CAM(x)``: [B, C, H, W]."""
        a = x.flatten(2)  # [B, C, HW]
        energy = torch.bmm(a, a.transpose(1, 2))  # [B, C, C]
        if self.energy == 'code':
            energy = energy.amax(-1, keepdim=True) - energy
        out = torch.bmm(softmax_fp32(energy, dim=-1), a)  # [B, C, HW]
        return self.gamma * out.view_as(x)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'DAChannelAttention')
        return x + self.attend(x)


@register('da', paper=_PAPER, arxiv='1809.02983', year=2018, family='context', complexity='O(N²·C + N·C²)')
class DualAttention(nn.Module):
    """DANet dual attention: ``y = x + α · PAM(x) + β · CAM(x)``.

    Args:
        channels: input and output channels C.
        rd_ratio, rd_channels, rd_divisor: width of the position branch's query and key (default C/8).
        channel_energy: energy of the channel branch, ``'paper'`` (default) or ``'code'``.
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
            channel_energy: str = 'paper',
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        if channel_energy not in _ENERGIES:
            raise ValueError(f'channel_energy must be one of {_ENERGIES}, got {channel_energy!r}')
        self.channels = check_channels(channels)
        self.position = DAPositionAttention(
            channels, rd_ratio=rd_ratio, rd_channels=rd_channels, rd_divisor=rd_divisor, device=device, dtype=dtype)
        self.channel = DAChannelAttention(channels, energy=channel_energy, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        """Reset both branches (α = β = 0)."""
        self.position.reset_parameters()
        self.channel.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'DualAttention')
        return x + self.position.attend(x) + self.channel.attend(x)
