"""Backbones built from local self-attention, registered with timm.

- ``sasa_resnet26`` / ``sasa_resnet38`` / ``sasa_resnet50``: the fully attentional ResNets of "Stand-Alone
  Self-Attention in Vision Models" (arXiv:1906.05909). Every 3×3 conv of the bottlenecks is a SASA layer (k = 7,
  8 heads), spatial downsampling is a 2×2 average pooling after the attention layer, and the stem is the paper's
  attention stem (attention with spatially-aware values inside 4×4 blocks, batch norm, 4×4 max pool).
  ``stem='conv'`` gives the paper's conv-stem variant (the ResNet 7×7 conv stem). Depths [1, 2, 4, 1],
  [2, 3, 5, 2], [3, 4, 6, 3].
- ``axial_resnet50``: the full axial-attention ResNet-50 of Axial-DeepLab (arXiv:2003.07853): bottlenecks of
  width ratio 0.5 and expansion 2 (the paper's Axial-ResNet-S) whose spatial conv is a height + width
  axial-attention pair (8 heads, global along each axis). Its stem replaces the 7×7 conv by an axial-attention
  pair of span 15 with stride 2 (followed by ReLU and the 3×3 max pool); this stem layer is visattn's choice,
  not a layer-by-layer copy of the paper's.
  ``axial_resnet50_convstem``: the same with the ResNet conv stem (64 channels, as DeepLab2's ``axial_resnet_s``;
  the PyTorch code of csrhddlam/axial-deeplab uses 32).
  Each global axial layer stores relative embeddings for offsets up to ``rel_span - 1`` = 254 (a table of
  2·255 - 1 = 509 positions per channel), as Axial-DeepLab's TensorFlow implementation (DeepLab2, ``MAX_SPAN =
  255``); farther offsets share the outermost embeddings. At 224² only the offsets of the feature size are
  used (56, 28, 14, 7). This table size is what gives the paper's parameter counts: DeepLab2's ``axial_resnet_s``
  backbone has 11,466,912 parameters, 12.49M with the 1024→1000 classifier (paper: 12.5M), and
  ``axial_resnet50_convstem(num_classes=0)`` has exactly as many. ``rel_span='feature'`` sizes the tables to
  each block's feature size at ``img_size`` instead (2·56 - 1, ..., 2·7 - 1 positions), as
  csrhddlam/axial-deeplab's ``axial50s``: 0.89M fewer parameters (11.6M), the same function at 224².
- ``halonet_h0``, ``halonet_h2``, ``halonet_h3``, ``halonet_h4``: HaloNets of "Scaling Local Self-Attention
  for Parameter Efficient Visual Backbones" (arXiv:2103.12731), on timm's ByobNet with visattn's `HaloAttn`
  (any input size). From the paper's table: block b, halo h, value multiplier rv (attention width
  rv·[64, 128, 256, 512]), bottleneck output multiplier rb (block outputs rb·[64, 128, 256, 512]), third-stage
  depth l3, final 1×1 conv width df, heads [4, 8, 8, 8], SiLU; timm registers ``halonet_h1``.
"""

from __future__ import annotations

import math
from typing import Any

import torch.nn as nn
from timm.models import generate_default_cfgs
from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg
from timm.models.resnet import Bottleneck

from ..layers.axial import AxialAttn
from ..layers.halo import HaloAttn
from ..layers.sasa import SasaStem, SelfAttn2d
from ._builder import build_checked, default_cfg, make_entrypoint
from .resnet import AttnResNet

__all__ = ['AxialBottleneck', 'LocalAttnResNet', 'SasaBottleneck', 'halonet_cfg']


class SasaBottleneck(Bottleneck):
    """timm's ``Bottleneck`` whose 3×3 conv is a local attention layer ``spatial_layer(width, width, stride=...)``.

    Args:
        inplanes, planes, stride, downsample, cardinality, base_width, reduce_first, dilation, first_dilation:
            as timm's ``Bottleneck`` (cardinality 1 and dilation 1 only).
        spatial_layer: the layer replacing the conv (default `SelfAttn2d`, the SASA layer).
        spatial_kwargs: its keyword arguments (default: k = 7, 8 heads).
        **kwargs: timm ``Bottleneck`` arguments (``act_layer``, ``norm_layer``, ``device``, ...).
    """

    expansion = 4
    norm_after_spatial = True  # keep the BN after the replaced conv

    def __init__(
            self,
            inplanes: int,
            planes: int,
            stride: int = 1,
            downsample: nn.Module | None = None,
            cardinality: int = 1,
            base_width: int = 64,
            reduce_first: int = 1,
            dilation: int = 1,
            first_dilation: int | None = None,
            spatial_layer: Any = SelfAttn2d,
            spatial_kwargs: dict[str, Any] | None = None,
            device=None,
            dtype=None,
            **kwargs: Any,
    ) -> None:
        if (first_dilation or dilation) != 1 or dilation != 1:
            raise ValueError(f'{type(self).__name__} does not support dilation (output_stride < 32), got {dilation}')
        if cardinality != 1:
            raise ValueError(f'{type(self).__name__} needs cardinality=1, got {cardinality}')
        if kwargs.get('aa_layer') is not None:
            raise ValueError(f'{type(self).__name__} downsamples by pooling after attention; aa_layer is not supported')
        super().__init__(
            inplanes, planes, stride, downsample, cardinality=cardinality, base_width=base_width,
            reduce_first=reduce_first, dilation=dilation, first_dilation=first_dilation, device=device, dtype=dtype,
            **kwargs)
        width = self.conv2.out_channels
        self.conv2 = spatial_layer(width, width, stride=stride, device=device, dtype=dtype, **(spatial_kwargs or {}))
        if not self.norm_after_spatial:
            self.bn2 = nn.Identity()


class AxialBottleneck(SasaBottleneck):
    """Axial-DeepLab's axial-attention block: expansion 2, the conv replaced by a height + width `AxialAttn`
    (its batch-normalised output is followed directly by the ReLU, as in the paper's block)."""

    expansion = 2
    norm_after_spatial = False

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault('spatial_layer', AxialAttn)
        super().__init__(inplanes, planes, stride, downsample, **kwargs)


class LocalAttnResNet(AttnResNet):
    """A timm ``ResNet`` of local-attention bottlenecks, with the stem of the chosen paper.

    Args:
        block, layers: bottleneck class and stage depths.
        stem: ``'conv'`` (ResNet 7×7 conv stem), ``'sasa'`` (SASA attention stem + BN + 4×4 max pool) or
            ``'axial'`` (axial-attention pair with span 15 and stride 2, then ReLU and the 3×3 max pool).
        rel_span: global axial layers get relative embeddings for offsets up to ``rel_span - 1`` (default 255, as
            Axial-DeepLab's TensorFlow implementation); ``'feature'`` sizes them to each block's feature size at
            ``img_size``.
        img_size: with ``rel_span='feature'``, the input size the relative embeddings are sized for (default 224).
        **kwargs: timm ``ResNet`` arguments (``num_classes``, ``stem_width``, ``channels``, ``block_args``, ...).
    """

    def __init__(
            self,
            block: Any,
            layers: tuple[int, ...],
            *,
            stem: str = 'conv',
            rel_span: int | str = 255,
            img_size: int = 224,
            **kwargs: Any,
    ) -> None:
        if stem not in ('conv', 'sasa', 'axial'):
            raise ValueError(f"stem must be 'conv', 'sasa' or 'axial', got {stem!r}")
        if kwargs.get('output_stride', 32) != 32:
            raise ValueError(f"output_stride must be 32 for local-attention ResNets, got {kwargs['output_stride']}")
        if rel_span != 'feature' and (isinstance(rel_span, bool) or not isinstance(rel_span, int) or rel_span < 1):
            raise ValueError(f"rel_span must be a positive int or 'feature', got {rel_span!r}")
        super().__init__(block, layers, **kwargs)
        dd = dict(device=kwargs.get('device'), dtype=kwargs.get('dtype'))
        in_chans, width = self.conv1.in_channels, self.conv1.out_channels
        if stem == 'sasa':
            self.conv1 = SasaStem(in_chans, width, **dd)
            self.act1 = nn.Identity()
            self.maxpool = nn.MaxPool2d(4, 4, ceil_mode=True)
            self.feature_info[0] = dict(self.feature_info[0], reduction=1)
        elif stem == 'axial':
            self.conv1 = AxialAttn(in_chans, width, span=15, stride=2, **dd)
            self.bn1 = nn.Identity()
        self._size_axial_embeddings(rel_span, img_size, dd)

    def _size_axial_embeddings(self, rel_span: int | str, img_size: int, dd: dict) -> None:
        """Give each global axial block relative embeddings for offsets up to ``rel_span - 1``, or with
        ``rel_span='feature'`` for its feature size at ``img_size`` (56 / 56→28 / 28→14 / 14→7 at 224²)."""
        size = math.ceil(img_size / 4)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for blk in stage:
                attn = blk.conv2
                if isinstance(attn, AxialAttn) and attn.height.span is None:
                    blk.conv2 = AxialAttn(
                        attn.channels, attn.out_channels, num_heads=attn.height.num_heads,
                        feat_size=size if rel_span == 'feature' else rel_span, stride=attn.stride, **dd)
                size = math.ceil(size / getattr(attn, 'stride', 1))


def halonet_cfg(
        block_size: int, halo_size: int, rv: float, rb: float, l3: int, df: int | None = None,
) -> ByoModelCfg:
    """The ByobNet config of a HaloNet from the hyper-parameters of the paper's table."""
    heads = (4, 8, 8, 8)
    blocks = tuple(
        ByoBlockCfg(
            type='self_attn', d=d, c=int(c * rb), s=s, gs=0, br=rv / rb,
            self_attn_kwargs=dict(num_heads=n, block_size=block_size, halo_size=halo_size))
        for d, c, s, n in zip((3, 3, l3, 3), (64, 128, 256, 512), (1, 2, 2, 2), heads))
    return ByoModelCfg(
        blocks=blocks, stem_chs=64, stem_type='7x7', stem_pool='maxpool', num_features=df or 0, act_layer='silu',
        self_attn_layer=HaloAttn)


_HALONETS: dict[str, tuple[ByoModelCfg, int]] = {
    'halonet_h0': (halonet_cfg(8, 3, rv=1.0, rb=0.5, l3=7), 256),
    'halonet_h2': (halonet_cfg(8, 3, rv=1.0, rb=1.25, l3=11), 256),
    'halonet_h3': (halonet_cfg(10, 3, rv=1.0, rb=1.5, l3=12, df=1024), 320),
    'halonet_h4': (halonet_cfg(12, 2, rv=1.0, rb=3.0, l3=12, df=1280), 384),
}

_SASA_DEPTHS = {26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3)}
_RESNETS: dict[str, tuple[dict[str, Any], str]] = {
    f'sasa_resnet{depth}': (dict(block=SasaBottleneck, layers=layers, stem='sasa'), '1906.05909')
    for depth, layers in _SASA_DEPTHS.items()
}
_AXIAL = dict(block=AxialBottleneck, layers=(3, 4, 6, 3), channels=(64, 128, 256, 512))
_RESNETS.update({
    'axial_resnet50': (dict(_AXIAL, stem='axial'), '2003.07853'),
    'axial_resnet50_convstem': (dict(_AXIAL, stem='conv'), '2003.07853'),
})

# the layers that see the image, per stem (timm adapts them to ``in_chans`` when it loads weights)
_FIRST_CONV = {'conv': 'conv1', 'sasa': ('conv1.qk', 'conv1.v'), 'axial': 'conv1.height.qkv'}

default_cfgs = generate_default_cfgs({
    **{name: default_cfg(arxiv, first_conv=_FIRST_CONV[args['stem']]) for name, (args, arxiv) in _RESNETS.items()},
    **{name: default_cfg(
        '2103.12731', input_size=(3, size, size), pool_size=(size // 32, size // 32), crop_pct=0.95,
        interpolation='bicubic', first_conv='stem.conv1.conv', classifier='head.fc')
       for name, (_, size) in _HALONETS.items()},
})


def _create_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> LocalAttnResNet:
    return build_checked(LocalAttnResNet, variant, pretrained, **dict(_RESNETS[variant][0], **kwargs))


def _create_halonet(variant: str, pretrained: bool = False, **kwargs: Any) -> ByobNet:
    return build_checked(
        ByobNet, variant, pretrained, model_cfg=_HALONETS[variant][0], feature_cfg=dict(flatten_sequential=True),
        **kwargs)


for _name, (_args, _arxiv) in _RESNETS.items():
    make_entrypoint(_name, __name__, _create_resnet, f'{_name} (arXiv:{_arxiv}); see the docstring of {__name__}.')
for _name in _HALONETS:
    make_entrypoint(_name, __name__, _create_halonet, f'{_name} (arXiv:2103.12731); see the docstring of {__name__}.')
