"""ResNet-50s with a context attention block where its paper puts it, registered with timm.

- ``resnet50_nl``: five non-local blocks, after every other residual block of res3 (2) and res4 (3), i.e. after
  blocks 1, 3 of ``layer2`` and 1, 3, 5 of ``layer3`` ("Non-local Neural Networks", arXiv:1711.07971). The paper
  compares 1, 5 and 10 blocks in its ResNet-50 ("deeper non-local models"): its 5-block variant adds "3 to res4
  and 2 to res3, to every other residual block", and improves on 1 block with half the blocks of the 10-block one.
  res5 is left out as the paper finds it least useful there (a 7×7 map gives too little spatial information).
- ``resnet50_efficient``: efficient attention modules in the same five places as the non-local blocks, since the
  paper presents the module as a drop-in replacement of the non-local block in the same ResNet-50 backbones
  ("Efficient Attention", arXiv:1812.01243).
- ``resnet50_a2``: five double attention blocks in the same five places, each with ``c_m = c_n = C/2``: the
  A²-Net ResNet-50 of "A²-Nets: Double Attention Networks" (arXiv:1810.11579), which compares its blocks with
  non-local ones in the same backbone (32.91M parameters; the paper's table could not be checked for the exact
  placement, so this follows the non-local paper's five places).
- ``resnet50_issa``, ``resnet50_lightnl``, ``resnet50_kronecker``, ``resnet50_bat``: interlaced sparse
  self-attention (arXiv:1907.12273), AutoNL's lightweight non-local (arXiv:2004.01961), Kronecker attention
  (arXiv:2007.08442) and timm's grouped bilinear attentional non-local (BAT, CVPR 2020) in the same five places:
  each paper presents its block as a cheaper non-local block, and none gives a ResNet-50 ImageNet table of its own
  (ISA and BAT report segmentation and video; AutoNL and KANets are MobileNet-based). Each block with its defaults:
  51,304,488 / 25,602,088 / 40,257,576 / 27,650,472 parameters.
- ``resnet50_ham``: the Hamburger (arXiv:2109.04553) after the last stage, its bread 2048 -> 512 -> 2048 (the
  width of the released head's Hamburger), where its segmentation head reads the backbone: 27,658,792 parameters.
  Its NMF starts from fixed bases (``rand_init=False``) so that the backbone is deterministic (the paper draws new
  random bases at every forward, as the ``ham`` head does).
- ``resnet50_cc``, ``resnet50_da``, ``resnet50_ema``, ``resnet50_external``: the segmentation-born blocks (CCNet
  arXiv:1811.11721, DANet arXiv:1809.02983, EMANet arXiv:1907.13426, external attention arXiv:2105.02358) after the
  last stage, before pooling, at the full width of ``layer4`` (2048 channels): where their heads read the backbone.

Module names of the residual blocks are timm's (blocks inserted inside a stage are named ``attn<i>``, after the
residual block ``i``), so timm's ResNet-50 weights load with ``strict=False`` and only the attention parameters
start fresh.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Any

import torch.nn as nn
from timm.models import generate_default_cfgs
from timm.models.resnet import Bottleneck

from ..layers.a2 import DoubleAttention
from ..layers.bat import BatNonLocalAttn
from ..layers.cc import CrissCrossAttention
from ..layers.da import DualAttention
from ..layers.efficient import EfficientAttention
from ..layers.ema import EMAttention
from ..layers.external import ExternalAttention
from ..layers.ham import Hamburger
from ..layers.issa import InterlacedSparseSelfAttn
from ..layers.kronecker import KroneckerAttn
from ..layers.lightnl import LightNonLocal
from ..layers.nl import NonLocal
from ._builder import build_checked, default_cfg, make_entrypoint, paper_id
from .resnet import AttnResNet

__all__ = ['ContextResNet']


class ContextResNet(AttnResNet):
    """``AttnResNet`` that can also place a block between chosen residual blocks of a stage.

    Args:
        block, layers: as timm's ``ResNet``.
        inner_attn_layer: block class inserted after the residual blocks named by ``inner_attn_after``.
        inner_attn_after: stage (1-4) -> indices of the residual blocks that a block follows.
        **kwargs: ``AttnResNet`` arguments (``stage_attn_layer``, ``stage_attn_after``, ``num_classes``, ...).
    """

    def __init__(
            self,
            block: Any,
            layers: tuple[int, ...],
            *,
            inner_attn_layer: Any = None,
            inner_attn_after: dict[int, tuple[int, ...]] | None = None,
            **kwargs: Any,
    ) -> None:
        super().__init__(block, layers, **kwargs)
        if inner_attn_layer is None:
            return
        dd = dict(device=kwargs.get('device'), dtype=kwargs.get('dtype'))
        for stage_idx, after in (inner_attn_after or {}).items():
            name = f'layer{stage_idx}'
            stage = getattr(self, name)
            bad = [i for i in after if not 0 <= i < len(stage)]
            if bad:
                raise ValueError(f'inner_attn_after[{stage_idx}] names blocks {bad}; {name} has {len(stage)} blocks')
            channels = self.feature_info[stage_idx]['num_chs']
            children: OrderedDict[str, nn.Module] = OrderedDict()
            for child_name, child in stage.named_children():
                children[child_name] = child
                if int(child_name) in after:
                    children[f'attn{child_name}'] = inner_attn_layer(channels, **dd)
            setattr(self, name, nn.Sequential(children))


_EVERY_OTHER_RES3_RES4 = {2: (1, 3), 3: (1, 3, 5)}


def double_attention_half(channels: int, **kwargs: Any) -> DoubleAttention:
    """The A²-Net ResNet-50's double attention block: ``c_m = c_n = C/2``."""
    return DoubleAttention(channels, c_m=channels // 2, c_n=channels // 2, **kwargs)


# name -> (ContextResNet arguments, arXiv id)
_MODELS: dict[str, tuple[dict[str, Any], str]] = {
    'resnet50_nl': (dict(inner_attn_layer=NonLocal, inner_attn_after=_EVERY_OTHER_RES3_RES4), '1711.07971'),
    'resnet50_efficient': (
        dict(inner_attn_layer=EfficientAttention, inner_attn_after=_EVERY_OTHER_RES3_RES4), '1812.01243'),
    'resnet50_a2': (
        dict(inner_attn_layer=double_attention_half, inner_attn_after=_EVERY_OTHER_RES3_RES4), '1810.11579'),
    'resnet50_issa': (
        dict(inner_attn_layer=InterlacedSparseSelfAttn, inner_attn_after=_EVERY_OTHER_RES3_RES4), '1907.12273'),
    'resnet50_lightnl': (
        dict(inner_attn_layer=LightNonLocal, inner_attn_after=_EVERY_OTHER_RES3_RES4), '2004.01961'),
    'resnet50_kronecker': (
        dict(inner_attn_layer=KroneckerAttn, inner_attn_after=_EVERY_OTHER_RES3_RES4), '2007.08442'),
    'resnet50_bat': (
        dict(inner_attn_layer=BatNonLocalAttn, inner_attn_after=_EVERY_OTHER_RES3_RES4),
        BatNonLocalAttn.attn_info.paper_url),
    'resnet50_ham': (
        dict(stage_attn_layer=partial(Hamburger, ham_channels=512, rand_init=False), stage_attn_after=(4,)),
        '2109.04553'),
    'resnet50_cc': (dict(stage_attn_layer=CrissCrossAttention, stage_attn_after=(4,)), '1811.11721'),
    'resnet50_da': (dict(stage_attn_layer=DualAttention, stage_attn_after=(4,)), '1809.02983'),
    'resnet50_ema': (dict(stage_attn_layer=EMAttention, stage_attn_after=(4,)), '1907.13426'),
    'resnet50_external': (dict(stage_attn_layer=ExternalAttention, stage_attn_after=(4,)), '2105.02358'),
}

default_cfgs = generate_default_cfgs({name: default_cfg(arxiv) for name, (_, arxiv) in _MODELS.items()})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> ContextResNet:
    args = dict(block=Bottleneck, layers=(3, 4, 6, 3), **_MODELS[variant][0])
    return build_checked(ContextResNet, variant, pretrained, **dict(args, **kwargs))


for _name, (_args, _arxiv) in _MODELS.items():
    make_entrypoint(_name, __name__, _create, f'{_name} ({paper_id(_arxiv)}); see the docstring of {__name__}.')
