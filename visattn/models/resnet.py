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

from typing import Any

import torch.nn as nn
from timm.models import generate_default_cfgs
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import Tensor

from .._utils import is_fx_proxy
from ..layers.bam import BottleneckAttnModule
from ..layers.cbam import Cbam
from ..layers.eca import EfficientChannelAttn
from ..layers.gc import GlobalContext
from ..layers.se import SqueezeExcite
from ..layers.sk import SelectiveKernel
from ._builder import build_checked, default_cfg, make_entrypoint

__all__ = ['AddFusedBasicBlock', 'AddFusedBottleneck', 'AttnResNet', 'SKBottleneck']


class AttnResNet(ResNet):
    """timm's ``ResNet`` with an attention block in chosen stages and/or after chosen stages.

    Args:
        block, layers: as timm's ``ResNet``.
        attn_layer: block class placed in each residual block of ``attn_stages`` (timm's ``se`` slot: after the
            last norm of the branch, before the addition).
        attn_stages: stages (1-4) whose residual blocks get ``attn_layer`` (default all).
        stage_attn_layer: block class appended to the end of each stage in ``stage_attn_after``.
        stage_attn_after: stages after which ``stage_attn_layer`` is placed (default 1, 2, 3).
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
            **kwargs: Any,
    ) -> None:
        block_args = dict(kwargs.pop('block_args', None) or {})
        if attn_layer is not None:
            block_args['attn_layer'] = attn_layer
        super().__init__(block, layers, block_args=block_args, **kwargs)
        dd = dict(device=kwargs.get('device'), dtype=kwargs.get('dtype'))
        stages = [getattr(self, f'layer{i + 1}') for i in range(len(layers))]
        for i, stage in enumerate(stages, start=1):
            if attn_layer is not None and i not in attn_stages:
                for blk in stage:
                    blk.se = None
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


class SKBottleneck(Bottleneck):
    """timm's ``Bottleneck`` whose 3×3 conv (with its BN and ReLU) is a Selective Kernel unit.

    The SK unit takes the conv's stride and grouping (``cardinality``) unless ``sk_kwargs`` sets ``groups``.
    """

    expansion = 4

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
            sk_kwargs: dict[str, Any] | None = None,
            device=None,
            dtype=None,
            **kwargs: Any,
    ) -> None:
        super().__init__(
            inplanes, planes, stride, downsample, cardinality=cardinality, base_width=base_width,
            reduce_first=reduce_first, dilation=dilation, first_dilation=first_dilation, device=device, dtype=dtype,
            **kwargs)
        sk_kwargs = dict(groups=cardinality, **(sk_kwargs or {}))
        first_dilation = first_dilation or dilation
        use_aa = not isinstance(self.aa, nn.Identity)
        self.conv2 = SelectiveKernel(
            self.conv1.out_channels, self.conv2.out_channels, stride=1 if use_aa else stride,
            dilations=(first_dilation, 2 * first_dilation), act_layer=kwargs.get('act_layer', nn.ReLU),
            norm_layer=kwargs.get('norm_layer', nn.BatchNorm2d), device=device, dtype=dtype, **sk_kwargs)
        self.bn2 = nn.Identity()
        self.act2 = nn.Identity()


_DEPTHS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}

# attention name -> (AttnResNet arguments, arXiv id)
_ATTN: dict[str, tuple[dict[str, Any], str]] = {
    'se': (dict(attn_layer=SqueezeExcite), '1709.01507'),
    'eca': (dict(attn_layer=EfficientChannelAttn), '1910.03151'),
    'cbam': (dict(attn_layer=Cbam), '1807.06521'),
    'bam': (dict(stage_attn_layer=BottleneckAttnModule), '1807.06514'),
    'gc': (dict(attn_layer=GlobalContext, attn_stages=(2, 3, 4)), '1904.11492'),
}

# name -> (AttnResNet arguments, arXiv id)
_ADD_FUSED = {BasicBlock: AddFusedBasicBlock, Bottleneck: AddFusedBottleneck}
_MODELS: dict[str, tuple[dict[str, Any], str]] = {
    f'resnet{depth}_{attn}': (dict(block=_ADD_FUSED[block] if hasattr(args.get('attn_layer'), 'forward_add')
                                   else block, layers=layers, **args), arxiv)
    for attn, (args, arxiv) in _ATTN.items()
    for depth, (block, layers) in _DEPTHS.items()
}
_MODELS.update({
    'resnet50_sk': (dict(block=SKBottleneck, layers=(3, 4, 6, 3)), '1903.06586'),
    'sknet50': (dict(block=SKBottleneck, layers=(3, 4, 6, 3), cardinality=32, base_width=4), '1903.06586'),
    'sknet101': (dict(block=SKBottleneck, layers=(3, 4, 23, 3), cardinality=32, base_width=4), '1903.06586'),
})

default_cfgs = generate_default_cfgs({name: default_cfg(arxiv) for name, (_, arxiv) in _MODELS.items()})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> AttnResNet:
    return build_checked(AttnResNet, variant, pretrained, **dict(_MODELS[variant][0], **kwargs))


for _name, (_args, _arxiv) in _MODELS.items():
    make_entrypoint(_name, __name__, _create, f'{_name} (arXiv:{_arxiv}); see the docstring of {__name__}.')
