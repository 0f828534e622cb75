"""ResNets with the gating blocks where their papers put them, registered with timm.

Built on timm's ``ResNet`` (same module names, so timm's plain ResNet weights load into them with
``strict=False`` and only the attention parameters start fresh):

- ``resnet{18,34,50,101,152}_se``: SE in every residual block, on the branch before the addition
  ("Squeeze-and-Excitation Networks", arXiv:1709.01507).
- ``resnet{...}_eca``: ECA in every block ("ECA-Net", arXiv:1910.03151).
- ``resnet{...}_cbam``: CBAM in every block, before the addition ("CBAM", arXiv:1807.06521).
- ``resnet{...}_bam``: BAM at the bottlenecks between stages 1-2, 2-3 and 3-4, none after stage 4
  ("BAM", arXiv:1807.06514).
- ``resnet{...}_gc``: GC after the last 1×1 conv of every block of stages c3-c5 ("GCNet", arXiv:1904.11492).
- ``resnet50_sk``: ResNet-50 whose 3×3 convs are SK units, SK[M=2, G=1, r=16] (the unit keeps the
  grouping of the conv it replaces); ``sknet50`` / ``sknet101``: SKNet-50/101, SK[2, 32, 16] units on
  ResNeXt 32×4d ("Selective Kernel Networks", arXiv:1903.06586).
"""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar

import torch.nn as nn
from timm.models import generate_default_cfgs
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import Tensor

from .._utils import is_fx_proxy
from ..layers.bam import BottleneckAttnModule
from ..layers.cbam import Cbam, LightCbam
from ..layers.coord import CoordAttn, SimpleCoordAttn
from ..layers.eca import CircularEfficientChannelAttn, EfficientChannelAttn, EfficientChannelAttnMlp
from ..layers.ela import EfficientLocalAttn
from ..layers.ese import EffectiveSqueezeExcite
from ..layers.gc import GlobalContext
from ..layers.ge import GatherExcite
from ..layers.parnet import SkipSqueezeExcite
from ..layers.polarized import PolarizedSelfAttn
from ..layers.psa import PyramidSplitAttn
from ..layers.se import SqueezeExcite
from ..layers.sge import SpatialGroupEnhance
from ..layers.shuffle import ShuffleAttn
from ..layers.simam import SimAM
from ..layers.sk import SelectiveKernel
from ..layers.splat import SplitAttn
from ..layers.strip import StripAttn
from ..layers.triplet import TripletAttn
from ._builder import build_checked, default_cfg, make_entrypoint, paper_id

__all__ = ['AddFusedBasicBlock', 'AddFusedBottleneck', 'AttnResNet', 'Conv2AttnBasicBlock', 'Conv2AttnBottleneck',
           'ConvAttnBottleneck', 'PSABottleneck', 'SKBottleneck', 'SplatBottleneck']


class AttnResNet(ResNet):
    """timm's ``ResNet`` with an attention block in chosen stages and/or after chosen stages.

    Args:
        block, layers: as timm's ``ResNet``.
        attn_layer: block class placed in each residual block of ``attn_stages`` (timm's ``se`` slot: after the
            last norm of the branch, before the addition).
        attn_stages: stages (1-4) whose residual blocks get ``attn_layer`` (default all).
        stage_attn_layer: block class appended to the end of each stage in ``stage_attn_after``.
        stage_attn_after: stages after which ``stage_attn_layer`` is placed (default 1, 2, 3).
        conv2_attn_layer: block class placed right after the 3×3 conv ``conv2`` of the residual blocks, before its
            batch norm (SimAM's place; needs ``Conv2AttnBasicBlock`` / ``Conv2AttnBottleneck`` blocks).
        mid_attn_layer: block class placed after ``conv2``'s batch norm and activation (SPNet's strip pooling
            module; needs ``Conv2AttnBottleneck`` blocks).
        conv2_attn_blocks: stage (1-4) -> indices of the residual blocks (negative from the end) that get
            ``conv2_attn_layer`` / ``mid_attn_layer``; the others get none (default: every block).
        **kwargs: timm ``ResNet`` arguments (``num_classes``, ``output_stride``, ``block_args``, ``device``, ...).
    """

    def __init__(
            self,
            block: Any,
            layers: tuple[int, ...],
            *,
            attn_layer: Any = None,
            attn_stages: tuple[int, ...] = (1, 2, 3, 4),
            stage_attn_layer: Any = None,
            stage_attn_after: tuple[int, ...] = (1, 2, 3),
            conv2_attn_layer: Any = None,
            mid_attn_layer: Any = None,
            conv2_attn_blocks: dict[int, tuple[int, ...]] | None = None,
            **kwargs: Any,
    ) -> None:
        block_args = dict(kwargs.pop('block_args', None) or {})
        if attn_layer is not None:
            block_args['attn_layer'] = attn_layer
        if conv2_attn_layer is not None:
            block_args['conv2_attn_layer'] = conv2_attn_layer
        if mid_attn_layer is not None:
            block_args['mid_attn_layer'] = mid_attn_layer
        super().__init__(block, layers, block_args=block_args, **kwargs)
        dd = dict(device=kwargs.get('device'), dtype=kwargs.get('dtype'))
        stages = [getattr(self, f'layer{i + 1}') for i in range(len(layers))]
        for i, stage in enumerate(stages, start=1):
            if attn_layer is not None and i not in attn_stages:
                for blk in stage:
                    blk.se = None
            if conv2_attn_blocks is not None:
                keep = {j % len(stage) for j in conv2_attn_blocks.get(i, ())}
                for j, blk in enumerate(stage):
                    if j not in keep:
                        blk.conv2_attn, blk.mid_attn = nn.Identity(), nn.Identity()
            if stage_attn_layer is not None and i in stage_attn_after:
                stage.append(stage_attn_layer(self.feature_info[i]['num_chs'], **dd))
        for m in self.modules():
            if hasattr(m, 'attn_info') and hasattr(m, 'reset_parameters'):
                m.reset_parameters()  # undo ResNet's blanket conv init where a paper initialises its block itself


class _AddFusedTail:
    """The end of a timm residual block when its attention (the ``se`` slot) has ``forward_add(x, shortcut)``:
    one call computes ``attn(x) + shortcut``, so the addition fuses with the attention's last product. The
    order and result are timm's (attention, drop path, addition); drop path takes timm's unfused route."""

    def attn_add(self, x: Tensor, shortcut: Tensor) -> Tensor:
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        if self.se is not None and self.drop_path is None and not is_fx_proxy(x):  # fx: the block is a leaf
            return self.se.forward_add(x, shortcut)
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        x += shortcut
        return x


class AddFusedBasicBlock(_AddFusedTail, BasicBlock):
    """timm's ``BasicBlock`` (same modules and outputs) with the attention's ``forward_add`` tail."""

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        x = self.bn2(self.conv2(x))
        return self.act2(self.attn_add(x, shortcut))


class AddFusedBottleneck(_AddFusedTail, Bottleneck):
    """timm's ``Bottleneck`` (same modules and outputs) with the attention's ``forward_add`` tail."""

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        x = self.bn3(self.conv3(x))
        return self.act3(self.attn_add(x, shortcut))


class _Conv2Attn:
    """The attention blocks around a residual block's 3×3 conv ``conv2``: ``conv2_attn`` right after it, before its
    batch norm, and ``mid_attn`` after its batch norm and activation (each the identity when not given)."""

    def init_conv2_attn(self, conv2_attn_layer: Any, mid_attn_layer: Any, dd: dict[str, Any]) -> None:
        width = self.conv2.out_channels
        self.conv2_attn = nn.Identity() if conv2_attn_layer is None else conv2_attn_layer(width, **dd)
        self.mid_attn = nn.Identity() if mid_attn_layer is None else mid_attn_layer(width, **dd)


class Conv2AttnBasicBlock(_AddFusedTail, _Conv2Attn, BasicBlock):
    """timm's ``BasicBlock`` with ``conv2_attn`` right after its second 3×3 conv, before ``bn2``."""

    def __init__(self, *args: Any, conv2_attn_layer: Any = None, mid_attn_layer: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if mid_attn_layer is not None:
            raise ValueError('Conv2AttnBasicBlock has no mid_attn_layer slot (its conv2 is the last conv)')
        self.init_conv2_attn(conv2_attn_layer, None, dict(device=kwargs.get('device'), dtype=kwargs.get('dtype')))

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        x = self.bn2(self.conv2_attn(self.conv2(x)))
        return self.act2(self.attn_add(x, shortcut))


class Conv2AttnBottleneck(_AddFusedTail, _Conv2Attn, Bottleneck):
    """timm's ``Bottleneck`` with ``conv2_attn`` right after its 3×3 conv (before ``bn2``) and ``mid_attn`` after
    ``bn2`` and ``act2`` (before the anti-aliasing pool and ``conv3``)."""

    def __init__(self, *args: Any, conv2_attn_layer: Any = None, mid_attn_layer: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.init_conv2_attn(conv2_attn_layer, mid_attn_layer,
                             dict(device=kwargs.get('device'), dtype=kwargs.get('dtype')))

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.drop_block(self.bn2(self.conv2_attn(self.conv2(x)))))
        x = self.bn3(self.conv3(self.aa(self.mid_attn(x))))
        return self.act3(self.attn_add(x, shortcut))


class ConvAttnBottleneck(Bottleneck):
    """timm's ``Bottleneck`` whose 3×3 conv is an attention block that convolves (``conv_attn``: SK, split
    attention, pyramid split attention), called as ``conv_attn(width, width, stride=, groups=, **attn_kwargs)``.

    The block takes the conv's stride and grouping (``cardinality``) unless ``attn_kwargs`` sets ``groups``; the
    3×3 conv's batch norm and activation stay unless ``own_norm`` (the block ends with its own).
    """

    expansion = 4
    conv_attn: ClassVar[Any] = None
    own_norm: ClassVar[bool] = True

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
            attn_kwargs: dict[str, Any] | None = None,
            device=None,
            dtype=None,
            **kwargs: Any,
    ) -> None:
        super().__init__(
            inplanes, planes, stride, downsample, cardinality=cardinality, base_width=base_width,
            reduce_first=reduce_first, dilation=dilation, first_dilation=first_dilation, device=device, dtype=dtype,
            **kwargs)
        use_aa = not isinstance(self.aa, nn.Identity)
        self.conv2 = self.make_conv(
            self.conv1.out_channels, self.conv2.out_channels, stride=1 if use_aa else stride,
            dilation=first_dilation or dilation, kwargs=kwargs,
            **{'groups': cardinality, 'device': device, 'dtype': dtype, **(attn_kwargs or {})})
        if self.own_norm:
            self.bn2 = nn.Identity()
            self.act2 = nn.Identity()

    def make_conv(self, width: int, out: int, *, stride: int, dilation: int, kwargs: dict[str, Any],
                  **attn_kwargs: Any) -> nn.Module:
        return self.conv_attn(width, out, stride=stride, dilation=dilation, **attn_kwargs)


class SKBottleneck(ConvAttnBottleneck):
    """timm's ``Bottleneck`` whose 3×3 conv (with its BN and ReLU) is a Selective Kernel unit, with the branches'
    dilations ``d`` and ``2d`` of the conv it replaces (``sk_kwargs``: further `SelectiveKernel` arguments)."""

    def __init__(self, *args: Any, sk_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, attn_kwargs=sk_kwargs, **kwargs)

    def make_conv(self, width: int, out: int, *, stride: int, dilation: int, kwargs: dict[str, Any],
                  **attn_kwargs: Any) -> nn.Module:
        return SelectiveKernel(
            width, out, stride=stride, dilations=(dilation, 2 * dilation),
            act_layer=kwargs.get('act_layer', nn.ReLU), norm_layer=kwargs.get('norm_layer', nn.BatchNorm2d),
            **attn_kwargs)


class SplatBottleneck(ConvAttnBottleneck):
    """timm's ``Bottleneck`` whose 3×3 conv (with its BN and ReLU) is ResNeSt's split attention (radix 2 by default,
    ``attn_kwargs``: further `SplitAttn` arguments); the downsampling stays in the strided split-attention conv."""

    def make_conv(self, width: int, out: int, *, stride: int, dilation: int, kwargs: dict[str, Any],
                  **attn_kwargs: Any) -> nn.Module:
        return SplitAttn(width, out, stride=stride, dilation=dilation, **{'radix': 2, **attn_kwargs})


class PSABottleneck(ConvAttnBottleneck):
    """EPSANet's bottleneck: the 3×3 conv is a pyramid split attention module (its BN and ReLU stay)."""

    own_norm = False

    def make_conv(self, width: int, out: int, *, stride: int, dilation: int, kwargs: dict[str, Any],
                  **attn_kwargs: Any) -> nn.Module:
        if dilation != 1:
            raise ValueError(f'PSABottleneck has no dilated form (output_stride < 32), got dilation {dilation}')
        attn_kwargs.pop('groups')  # the pyramid's branches have their own groups
        return PyramidSplitAttn(width, out, stride=stride, **attn_kwargs)


_DEPTHS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}

_FIRST_WAVE_DEPTHS = (18, 34, 50, 101, 152)
_SECOND_WAVE_DEPTHS = (18, 34, 50, 101)

# attention name -> (AttnResNet arguments, arXiv id, depths): the block in the se slot of every residual block (on
# the branch, after its last norm, before the addition) unless the arguments say otherwise
_ATTN: dict[str, tuple[dict[str, Any], str, tuple[int, ...]]] = {
    'se': (dict(attn_layer=SqueezeExcite), '1709.01507', _FIRST_WAVE_DEPTHS),
    'eca': (dict(attn_layer=EfficientChannelAttn), '1910.03151', _FIRST_WAVE_DEPTHS),
    'cbam': (dict(attn_layer=Cbam), '1807.06521', _FIRST_WAVE_DEPTHS),
    'bam': (dict(stage_attn_layer=BottleneckAttnModule), '1807.06514', _FIRST_WAVE_DEPTHS),
    'gc': (dict(attn_layer=GlobalContext, attn_stages=(2, 3, 4)), '1904.11492', _FIRST_WAVE_DEPTHS),
    'triplet': (dict(attn_layer=TripletAttn), '2010.03045', _SECOND_WAVE_DEPTHS),
    'simam': (dict(conv2_attn_layer=partial(SimAM, e_lambda=0.1)), 'ICML 2021, PMLR 139:11863', _SECOND_WAVE_DEPTHS),
    'shuffle': (dict(attn_layer=ShuffleAttn), '2102.00240', _SECOND_WAVE_DEPTHS),
    'sge': (dict(attn_layer=SpatialGroupEnhance), '1905.09646', _SECOND_WAVE_DEPTHS),
    'coord': (dict(attn_layer=CoordAttn), '2103.02907', _SECOND_WAVE_DEPTHS),
    'ge': (dict(attn_layer=GatherExcite), '1810.12348', _SECOND_WAVE_DEPTHS),
    'ese': (dict(stage_attn_layer=EffectiveSqueezeExcite, stage_attn_after=(1, 2, 3, 4)), '1911.06667', (50,)),
    'ecam': (dict(attn_layer=EfficientChannelAttnMlp), '1910.03151', (50,)),
    'ceca': (dict(attn_layer=CircularEfficientChannelAttn), '1910.03151', (50,)),
    'lcbam': (dict(attn_layer=LightCbam), '1807.06521', (50,)),
    'scoord': (dict(attn_layer=SimpleCoordAttn), '2103.02907', (50,)),
    'ela': (dict(attn_layer=EfficientLocalAttn), '2403.01123', (50,)),
    'strip': (dict(mid_attn_layer=StripAttn, conv2_attn_blocks={1: (-1,), 2: (-1,), 3: (-1,), 4: (0, 1, 2)}),
              '2003.13328', (50,)),
    'polarized': (dict(attn_layer=PolarizedSelfAttn), '2107.00782', (50,)),
    'parnet': (dict(stage_attn_layer=SkipSqueezeExcite, stage_attn_after=(1, 2, 3, 4)), '2110.07641', (50,)),
}

_ADD_FUSED = {BasicBlock: AddFusedBasicBlock, Bottleneck: AddFusedBottleneck}
_CONV2_ATTN = {BasicBlock: Conv2AttnBasicBlock, Bottleneck: Conv2AttnBottleneck}


def _block(depth: int, args: dict[str, Any]) -> Any:
    """The residual block class of a ResNet of ``depth`` with the attention of ``args``."""
    block = _DEPTHS[depth][0]
    if 'conv2_attn_layer' in args or 'mid_attn_layer' in args:
        return _CONV2_ATTN[block]
    return _ADD_FUSED[block] if hasattr(args.get('attn_layer'), 'forward_add') else block


# name -> (AttnResNet arguments, arXiv id)
_MODELS: dict[str, tuple[dict[str, Any], str]] = {
    f'resnet{depth}_{attn}': (dict(block=_block(depth, args), layers=_DEPTHS[depth][1], **args), arxiv)
    for attn, (args, arxiv, depths) in _ATTN.items()
    for depth in depths
}
_MODELS.update({
    'resnet50_sk': (dict(block=SKBottleneck, layers=(3, 4, 6, 3)), '1903.06586'),
    'sknet50': (dict(block=SKBottleneck, layers=(3, 4, 6, 3), cardinality=32, base_width=4), '1903.06586'),
    'sknet101': (dict(block=SKBottleneck, layers=(3, 4, 23, 3), cardinality=32, base_width=4), '1903.06586'),
    'resnet50_splat': (dict(block=SplatBottleneck, layers=(3, 4, 6, 3)), '2004.08955'),
    'epsanet50': (dict(block=PSABottleneck, layers=(3, 4, 6, 3)), '2105.14447'),
    'epsanet101': (dict(block=PSABottleneck, layers=(3, 4, 23, 3)), '2105.14447'),
})

default_cfgs = generate_default_cfgs({name: default_cfg(arxiv) for name, (_, arxiv) in _MODELS.items()})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> AttnResNet:
    return build_checked(AttnResNet, variant, pretrained, **dict(_MODELS[variant][0], **kwargs))


for _name, (_args, _arxiv) in _MODELS.items():
    make_entrypoint(_name, __name__, _create, f'{_name} ({paper_id(_arxiv)}); see the docstring of {__name__}.')
