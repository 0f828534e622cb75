"""Decode heads for semantic segmentation, composed as in mmsegmentation's decode heads.

- `FCNHead`: "Fully Convolutional Networks for Semantic Segmentation" (arXiv:1411.4038), in the form used
  as the auxiliary head on stage 3 of every ADE20K recipe: 3×3 conv-BN-ReLU blocks, dropout, a 1×1 classifier.
- `AttnHead`: 3×3 conv-BN-ReLU to ``channels`` → a visattn 2-D block (``visattn.create_attn(attn, channels)``),
  applied ``recurrence`` times with shared weights → 3×3 conv-BN-ReLU → optionally concatenated with the
  head's input and fused by a 3×3 conv-BN-ReLU → dropout → 1×1 classifier (mmsegmentation's CC/NL head form).

The named heads (`HEADS`) fix the composition each paper uses:

- ``cc``: CCNet, "CCNet: Criss-Cross Attention for Semantic Segmentation" (arXiv:1811.11721): 2048 → 512
  reduction first, the ``cc`` block (which applies itself R = 2 times with shared weights), output concatenated
  with the input.
- ``da``: DANet, "Dual Attention Network for Scene Segmentation" (arXiv:1809.02983), `DAHead`: a position
  attention branch and a channel attention branch (the ``da_position`` and ``da_channel`` blocks), each behind
  its own reduction and output convs, summed before the classifier, as the paper fuses them.
- ``ema``: EMANet, "Expectation-Maximization Attention Networks for Semantic Segmentation" (arXiv:1907.13426),
  output concatenated with the input as in the released head.
- ``external``: "Beyond Self-attention: External Attention using Two Linear Layers for Visual Tasks"
  (arXiv:2105.02358).
- ``nl``: "Non-local Neural Networks" (arXiv:1711.07971), placed as CCNet places its block (concat input).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_channels, check_nchw
from ..registry import create_attn


class ConvBNReLU(nn.Sequential):
    """k×k conv (no bias) → BatchNorm → ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, device=None,
                 dtype=None) -> None:
        dd = dict(device=device, dtype=dtype)
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False, **dd),
            nn.BatchNorm2d(out_channels, **dd),
            nn.ReLU(inplace=True),
        )


class _Classifier(nn.Module):
    """Dropout and the 1×1 classifier that ends every head (weights N(0, 0.01), bias 0, as mmsegmentation)."""

    def __init__(self, channels: int, num_classes: int, dropout: float, *, device=None, dtype=None) -> None:
        super().__init__()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, check_channels(num_classes, 'num_classes'), 1, device=device,
                                  dtype=dtype)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_seg(self.dropout(x))


class FCNHead(nn.Module):
    """``num_convs`` 3×3 conv-BN-ReLU blocks (optionally concatenated with the input and fused), then the
    classifier.

    Args:
        in_channels: channels of the feature map it reads.
        num_classes: output classes K.
        channels: width of the convs (default 256, the auxiliary head of the ADE20K recipes).
        num_convs: number of 3×3 conv blocks (default 1).
        concat_input: concatenate the input with the convs' output and fuse by a 3×3 conv (default False).
        dropout: dropout before the classifier (default 0.1).

    Shapes:
        x: [B, in_channels, H, W] -> [B, K, H, W].
    """

    def __init__(
            self,
            in_channels: int,
            num_classes: int,
            *,
            channels: int = 256,
            num_convs: int = 1,
            concat_input: bool = False,
            dropout: float = 0.1,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.in_channels = check_channels(in_channels, 'in_channels')
        check_channels(channels)
        if num_convs < 1:
            raise ValueError(f'num_convs must be >= 1, got {num_convs}')
        self.convs = nn.Sequential(*[ConvBNReLU(in_channels if i == 0 else channels, channels, **dd)
                                     for i in range(num_convs)])
        self.conv_cat = ConvBNReLU(in_channels + channels, channels, **dd) if concat_input else None
        self.cls = _Classifier(channels, num_classes, dropout, **dd)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.in_channels, type(self).__name__)
        out = self._body(x)
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.cls(out)

    def _body(self, x: Tensor) -> Tensor:
        return self.convs(x)


class AttnHead(FCNHead):
    """A decode head around one visattn 2-D block: an `FCNHead` with two convs and the block between them.

    Args:
        in_channels: channels of the feature map it reads (2048 for a ResNet-50's stage 4).
        num_classes: output classes K.
        attn: registry name (or class) of the block, built as ``create_attn(attn, channels, **attn_kwargs)``.
        channels: width the input is reduced to before the block (default 512).
        attn_kwargs: keyword arguments of the block (default: the block's own defaults).
        recurrence: times the block is applied, with shared weights (default 1; the ``cc`` block recurs itself).
        concat_input: concatenate the input with the output conv's result and fuse by a 3×3 conv (default True).
        dropout: dropout before the classifier (default 0.1).

    Shapes:
        x: [B, in_channels, H, W] -> [B, K, H, W].
    """

    def __init__(
            self,
            in_channels: int,
            num_classes: int,
            attn: str | type[nn.Module],
            *,
            channels: int = 512,
            attn_kwargs: dict[str, Any] | None = None,
            recurrence: int = 1,
            concat_input: bool = True,
            dropout: float = 0.1,
            device=None,
            dtype=None,
    ) -> None:
        dd = dict(device=device, dtype=dtype)
        super().__init__(in_channels, num_classes, channels=channels, num_convs=2, concat_input=concat_input,
                         dropout=dropout, **dd)
        if recurrence < 1:
            raise ValueError(f'recurrence must be >= 1, got {recurrence}')
        if attn_kwargs is not None and not isinstance(attn_kwargs, dict):
            raise TypeError(f'attn_kwargs must be a dict or None, got {type(attn_kwargs).__name__}')
        self.recurrence = recurrence
        self.attn = create_attn(attn, channels, **(attn_kwargs or {}), **dd)

    def _body(self, x: Tensor) -> Tensor:
        out = self.convs[0](x)
        for _ in range(self.recurrence):
            out = self.attn(out)
        return self.convs[1](out)


class DAHead(nn.Module):
    """DANet's head: position attention and channel attention in two branches, each
    3×3 conv-BN-ReLU → block → 3×3 conv-BN-ReLU, summed, then the classifier.

    Args:
        in_channels: channels of the feature map it reads.
        num_classes: output classes K.
        channels: width of both branches (default 512, i.e. 2048 / 4 as the paper).
        position_kwargs, channel_kwargs: keyword arguments of the ``da_position`` and ``da_channel`` blocks.
        dropout: dropout before the classifier (default 0.1).

    Shapes:
        x: [B, in_channels, H, W] -> [B, K, H, W].
    """

    def __init__(
            self,
            in_channels: int,
            num_classes: int,
            *,
            channels: int = 512,
            position_kwargs: dict[str, Any] | None = None,
            channel_kwargs: dict[str, Any] | None = None,
            dropout: float = 0.1,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.in_channels = check_channels(in_channels, 'in_channels')
        check_channels(channels)

        def branch(block: str, kwargs: dict[str, Any] | None) -> nn.Sequential:
            return nn.Sequential(ConvBNReLU(in_channels, channels, **dd),
                                 create_attn(block, channels, **(kwargs or {}), **dd),
                                 ConvBNReLU(channels, channels, **dd))

        self.position = branch('da_position', position_kwargs)
        self.channel = branch('da_channel', channel_kwargs)
        self.cls = _Classifier(channels, num_classes, dropout, **dd)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.in_channels, type(self).__name__)
        return self.cls(self.position(x) + self.channel(x))


# head name -> AttnHead arguments (the paper's composition); 'fcn' and 'da' have their own classes
HEADS: dict[str, dict[str, Any]] = {
    'cc': dict(attn='cc', concat_input=True),
    'ema': dict(attn='ema', concat_input=True),
    'external': dict(attn='external', concat_input=False),
    'nl': dict(attn='nl', concat_input=True),
}


def list_heads() -> list[str]:
    """Names accepted by `create_head`."""
    return sorted(['fcn', 'da', *HEADS])


def create_head(
        name: str,
        in_channels: int,
        num_classes: int,
        *,
        channels: int = 512,
        attn_kwargs: dict[str, Any] | None = None,
        dropout: float = 0.1,
        device=None,
        dtype=None,
) -> nn.Module:
    """The decode head ``name`` (see `list_heads`); any other registered block name gives a plain `AttnHead`.

    ``fcn`` is the FCN decode head of the ADE20K recipes: two 3×3 convs, input concatenated. For ``da``,
    ``attn_kwargs`` may hold ``{'position': {...}, 'channel': {...}}``, the keyword arguments of each branch's block.
    """
    dd = dict(device=device, dtype=dtype)
    if not isinstance(name, str):
        raise TypeError(f'head must be a str, got {type(name).__name__}')
    if name == 'fcn':
        if attn_kwargs:
            raise ValueError(f'the fcn head has no attention block; attn_kwargs must be empty, got {attn_kwargs}')
        return FCNHead(in_channels, num_classes, channels=channels, num_convs=2, concat_input=True,
                       dropout=dropout, **dd)
    if name == 'da':
        kw = dict(attn_kwargs or {})
        unknown = set(kw) - {'position', 'channel'}
        if unknown:
            raise ValueError(
                f"attn_kwargs of the da head takes the keys 'position' and 'channel', got {sorted(unknown)}")
        return DAHead(in_channels, num_classes, channels=channels, position_kwargs=kw.get('position'),
                      channel_kwargs=kw.get('channel'), dropout=dropout, **dd)
    preset = HEADS.get(name, dict(attn=name))
    return AttnHead(in_channels, num_classes, channels=channels, attn_kwargs=attn_kwargs, dropout=dropout,
                    **preset, **dd)
