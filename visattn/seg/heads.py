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
- ``issa``: ISANet, "Interlaced Sparse Self-Attention for Semantic Segmentation" (arXiv:1907.12273), `ISAHead` as
  mmsegmentation's: 3×3 conv-BN-ReLU to ``channels``, the ``issa`` block (long-range then short-range attention),
  its output concatenated with the block's input and fused by a 1×1 conv-BN-ReLU.
- ``ham``: HamNet, "Is Attention Better Than Matrix Decomposition?" (arXiv:2109.04553), `HamHead` in the single-level
  form of the released ResNet head (``HamHead`` of ``seg_mm``): 3×3 squeeze conv, the ``ham`` block (Hamburger with
  NMF), 3×3 align conv, concatenated with the input and fused by a 3×3 conv. The paper's ``LightHamHead`` (SegNeXt)
  concatenates several backbone levels first; the encoder-decoder here gives the head one level, hence this form.
- ``strip``: SPNet, "Strip Pooling: Rethinking Spatial Pooling for Scene Parsing" (arXiv:2003.13328), `SPHead` as the
  released code: 1×1 conv-BN-ReLU to ``channels`` (the paper's C/2), two mixed pooling modules (`MixedPooling`:
  pyramid pooling at 20×20 and 12×12 plus strip pooling, residual), 3×3 conv-BN-ReLU to ``channels / 2``, classifier.
  The strip pooling module itself (the ``strip`` block) belongs to SPNet's backbone: ``resnet50_strip``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
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


class ISAHead(nn.Module):
    """ISANet's head (mmsegmentation's ``ISAHead``): 3×3 conv-BN-ReLU to ``channels``, interlaced sparse
    self-attention, its output concatenated with its input (the conv's output) and fused by a 1×1 conv-BN-ReLU, then
    the classifier.

    Args:
        in_channels: channels of the feature map it reads.
        num_classes: output classes K.
        channels: width of the head (default 512).
        attn_kwargs: keyword arguments of the ``issa`` block (its defaults: down factor (8, 8), C/2 = 256 query/key
            channels at 512, as mmseg's ``isa_channels``).
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
            attn_kwargs: dict[str, Any] | None = None,
            dropout: float = 0.1,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.in_channels = check_channels(in_channels, 'in_channels')
        check_channels(channels)
        self.in_conv = ConvBNReLU(in_channels, channels, **dd)
        self.isa = create_attn('issa', channels, **(attn_kwargs or {}), **dd)
        self.out_conv = ConvBNReLU(2 * channels, channels, 1, **dd)
        self.cls = _Classifier(channels, num_classes, dropout, **dd)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.in_channels, type(self).__name__)
        x = self.in_conv(x)
        return self.cls(self.out_conv(torch.cat([self.isa(x), x], dim=1)))


class HamHead(nn.Module):
    """HamNet's head on one feature level (the released ``HamHead`` for ResNets): 3×3 squeeze conv-BN-ReLU to
    ``ham_channels``, the Hamburger, 3×3 align conv-BN-ReLU to ``channels``, optionally concatenated with the head's
    input and fused by a 3×3 conv-BN-ReLU, then the classifier.

    Args:
        in_channels: channels of the feature map it reads.
        num_classes: output classes K.
        channels: width after the align conv (default 512).
        ham_channels: width of the Hamburger (default ``channels``; the released config: 512).
        attn_kwargs: keyword arguments of the ``ham`` block (default its own: NMF, r = 64, 6/7 steps).
        concat_input: concatenate the input and fuse by a 3×3 conv (default True, as the released head).
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
            ham_channels: int | None = None,
            attn_kwargs: dict[str, Any] | None = None,
            concat_input: bool = True,
            dropout: float = 0.1,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.in_channels = check_channels(in_channels, 'in_channels')
        check_channels(channels)
        ham_channels = channels if ham_channels is None else check_channels(ham_channels, 'ham_channels')
        self.squeeze = ConvBNReLU(in_channels, ham_channels, **dd)
        self.hamburger = create_attn('ham', ham_channels, **(attn_kwargs or {}), **dd)
        self.align = ConvBNReLU(ham_channels, channels, **dd)
        self.conv_cat = ConvBNReLU(in_channels + channels, channels, **dd) if concat_input else None
        self.cls = _Classifier(channels, num_classes, dropout, **dd)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.in_channels, type(self).__name__)
        out = self.align(self.hamburger(self.squeeze(x)))
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.cls(out)


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], dd: dict[str, Any]
             ) -> nn.Sequential:
    """k×k conv without bias ('same' padding) → BatchNorm."""
    k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, k, padding=(k[0] // 2, k[1] // 2), bias=False, **dd),
                         nn.BatchNorm2d(out_channels, **dd))


class MixedPooling(nn.Module):
    """SPNet's mixed pooling module (MPM), as the released ``StripPooling`` of ``customize.py``.

    Two 1×1 conv-BN-ReLU reduce C to C/4 twice (x₁, x₂). The pyramid branch sums a 3×3 conv-BN of x₁ with 3×3 conv-BN
    of x₁ average-pooled to ``pool_sizes[0]``² and ``pool_sizes[1]``² (bilinearly upsampled), then ReLU and a 3×3
    conv-BN-ReLU; the strip branch sums a 1×3 conv-BN of x₂'s column averages (a 1 × W strip) and a 3×1 conv-BN of its
    row averages (H × 1), each expanded back to H × W, then ReLU and a 3×3 conv-BN-ReLU. The two branches are
    concatenated, a 1×1 conv-BN restores C, and ``y = ReLU(x + out)``.

    Args:
        channels: input and output channels C.
        pool_sizes: the two square pooling sizes of the pyramid branch (default (20, 12), the released head's).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(self, channels: int, pool_sizes: tuple[int, int] = (20, 12), *, device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        if len(pool_sizes) != 2 or any(not isinstance(p, int) or p < 1 for p in pool_sizes):
            raise ValueError(f'pool_sizes must be two ints >= 1, got {pool_sizes!r}')
        self.pool_sizes = (pool_sizes[0], pool_sizes[1])
        inter = max(1, channels // 4)
        self.conv1_1 = ConvBNReLU(channels, inter, 1, **dd)
        self.conv1_2 = ConvBNReLU(channels, inter, 1, **dd)
        self.conv2_0 = _conv_bn(inter, inter, 3, dd)
        self.conv2_1 = _conv_bn(inter, inter, 3, dd)
        self.conv2_2 = _conv_bn(inter, inter, 3, dd)
        self.conv2_3 = _conv_bn(inter, inter, (1, 3), dd)
        self.conv2_4 = _conv_bn(inter, inter, (3, 1), dd)
        self.conv2_5 = ConvBNReLU(inter, inter, **dd)
        self.conv2_6 = ConvBNReLU(inter, inter, **dd)
        self.conv3 = _conv_bn(2 * inter, channels, 1, dd)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, type(self).__name__)
        size = x.shape[-2:]
        x1, x2 = self.conv1_1(x), self.conv1_2(x)
        pools = [F.interpolate(conv(F.adaptive_avg_pool2d(x1, p)), size=size, mode='bilinear', align_corners=True)
                 for conv, p in ((self.conv2_1, self.pool_sizes[0]), (self.conv2_2, self.pool_sizes[1]))]
        pyramid = self.conv2_0(x1) + pools[0] + pools[1]
        # the 1 × W and H × 1 strips, expanded by broadcasting (what bilinear upsampling of a strip gives)
        strips = self.conv2_3(x2.mean(2, keepdim=True)) + self.conv2_4(x2.mean(3, keepdim=True))
        out = self.conv3(torch.cat([self.conv2_5(F.relu(pyramid)), self.conv2_6(F.relu(strips))], dim=1))
        return F.relu(x + out)


class SPHead(nn.Module):
    """SPNet's head (the released ``SPHead``): 1×1 conv-BN-ReLU to ``channels``, two mixed pooling modules, 3×3
    conv-BN-ReLU to ``channels // 2``, dropout and the classifier.

    Args:
        in_channels: channels of the feature map it reads.
        num_classes: output classes K.
        channels: width of the mixed pooling modules (the released head: in_channels / 2 = 1024 for a ResNet-50;
            default 512, the encoder-decoder's head width).
        pool_sizes: pooling sizes of the modules' pyramid branch (default (20, 12)).
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
            pool_sizes: tuple[int, int] = (20, 12),
            dropout: float = 0.1,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.in_channels = check_channels(in_channels, 'in_channels')
        check_channels(channels)
        self.trans_layer = ConvBNReLU(in_channels, channels, 1, **dd)
        self.strip_pool1 = MixedPooling(channels, pool_sizes, **dd)
        self.strip_pool2 = MixedPooling(channels, pool_sizes, **dd)
        self.score_layer = ConvBNReLU(channels, max(1, channels // 2), **dd)
        self.cls = _Classifier(max(1, channels // 2), num_classes, dropout, **dd)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.in_channels, type(self).__name__)
        return self.cls(self.score_layer(self.strip_pool2(self.strip_pool1(self.trans_layer(x)))))


# head name -> AttnHead arguments (the paper's composition); 'fcn' and 'da' have their own classes
HEADS: dict[str, dict[str, Any]] = {
    'cc': dict(attn='cc', concat_input=True),
    'ema': dict(attn='ema', concat_input=True),
    'external': dict(attn='external', concat_input=False),
    'nl': dict(attn='nl', concat_input=True),
}


# heads whose composition differs from AttnHead's: name -> class (each takes attn_kwargs for its block)
_CLASS_HEADS: dict[str, type[nn.Module]] = {'issa': ISAHead, 'ham': HamHead, 'strip': SPHead}


def list_heads() -> list[str]:
    """Names accepted by `create_head`."""
    return sorted(['fcn', 'da', *_CLASS_HEADS, *HEADS])


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
    if name in _CLASS_HEADS:
        if name == 'strip':
            if attn_kwargs:
                raise ValueError(f'the strip head has no attention block; attn_kwargs must be empty, got {attn_kwargs}')
            return SPHead(in_channels, num_classes, channels=channels, dropout=dropout, **dd)
        return _CLASS_HEADS[name](in_channels, num_classes, channels=channels, attn_kwargs=attn_kwargs,
                                  dropout=dropout, **dd)
    preset = HEADS.get(name, dict(attn=name))
    return AttnHead(in_channels, num_classes, channels=channels, attn_kwargs=attn_kwargs, dropout=dropout,
                    **preset, **dd)
