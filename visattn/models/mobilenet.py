"""MobileNetV2 with an attention block in its blocks, registered with timm.

Built on timm's EfficientNet builder with ``mobilenetv2_100``'s architecture (MobileNetV2, arXiv:1801.04381;
same modules and names, so its weights load with ``strict=False`` and only the attention starts fresh), with the
block where its paper's released MobileNetV2 has it:

- ``mobilenetv2_100_coord``: coordinate attention, reduction r = 32 with at least 8 channels, after the depthwise
  convolution (with its BN and ReLU6) and before the linear 1×1 projection of every expanding block (not the
  first, depthwise-separable one), i.e. in timm's squeeze-excitation slot ("Coordinate Attention for Efficient
  Mobile Network Design", Hou, Zhou, Feng, CVPR 2021, arXiv:2103.02907). 3.95M parameters, the paper's 3.95M.
- ``mobilenetv2_100_triplet``: triplet attention at the end of every block (the first one included), after the
  projection's BN and before the residual addition (``end_attn``; "Rotate to Attend: Convolutional Triplet
  Attention Module", Misra et al., WACV 2021, arXiv:2010.03045). 3.51M parameters, the paper's 3.51M.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch.nn as nn
from timm.models import generate_default_cfgs
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models._efficientnet_builder import decode_arch_def, resolve_act_layer, resolve_bn_args, round_channels
from timm.models.efficientnet import EfficientNet, _create_effnet
from torch import Tensor

from ..layers.coord import CoordAttn
from ..layers.triplet import TripletAttn
from ._builder import check_pretrained_source, default_cfg, make_entrypoint, paper_id

__all__ = ['attn_in_se_slot', 'EndAttnDepthwiseSeparable', 'EndAttnInvertedResidual']

# MobileNetV2's stages (timm's mobilenetv2_100), each block tagged to get the attention in its se slot
_ARCH = [
    ['ds_r1_k3_s1_c16'],
    ['ir_r2_k3_s2_e6_c24'],
    ['ir_r3_k3_s2_e6_c32'],
    ['ir_r4_k3_s2_e6_c64'],
    ['ir_r3_k3_s1_e6_c96'],
    ['ir_r3_k3_s2_e6_c160'],
    ['ir_r1_k3_s1_e6_c320'],
]


def attn_in_se_slot(attn_layer: Any, channels: int, rd_ratio: float | None = None, act_layer: Any = None,
                    **kwargs: Any) -> nn.Module:
    """A visattn block built in the se slot of timm's EfficientNet blocks: the builder's squeeze-excitation ratio
    and activation are SE's, not the block's, so they are dropped (the block keeps its paper's own)."""
    return attn_layer(channels, **kwargs)


class EndAttnDepthwiseSeparable(DepthwiseSeparableConv):
    """timm's ``DepthwiseSeparableConv`` (same modules and outputs) with ``end_attn`` after its last BN, before
    the residual addition."""

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.se(self.aa(self.bn1(self.conv_dw(x))))
        x = self.end_attn(self.bn2(self.conv_pw(x)))
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class EndAttnInvertedResidual(InvertedResidual):
    """timm's ``InvertedResidual`` (same modules and outputs) with ``end_attn`` after the projection's BN, before
    the residual addition."""

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.aa(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x)))))
        x = self.end_attn(self.bn3(self.conv_pwl(self.se(x))))
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


_END_ATTN = {DepthwiseSeparableConv: EndAttnDepthwiseSeparable, InvertedResidual: EndAttnInvertedResidual}

# name -> (block, arXiv id, where: 'se' slot or block 'end')
_MODELS: dict[str, tuple[Any, str, str]] = {
    'mobilenetv2_100_coord': (CoordAttn, '2103.02907', 'se'),
    'mobilenetv2_100_triplet': (TripletAttn, '2010.03045', 'end'),
}

default_cfgs = generate_default_cfgs({
    name: default_cfg(arxiv, interpolation='bicubic', first_conv='conv_stem', classifier='classifier')
    for name, (_, arxiv, _) in _MODELS.items()
})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> EfficientNet:
    check_pretrained_source(variant, pretrained, kwargs)
    attn_layer, _, where = _MODELS[variant]
    dd = dict(device=kwargs.get('device'), dtype=kwargs.get('dtype'))
    # the se tag marks the slot (its ratio is SE's, unused); the first, non-expanding block keeps none
    arch = [[f'{b}_se0.25' if b.startswith('ir') else b for b in stage] for stage in _ARCH] if where == 'se' else _ARCH
    model_kwargs = dict(
        block_args=decode_arch_def(arch),
        num_features=1280,
        stem_size=32,
        round_chs_fn=partial(round_channels, multiplier=1.0),
        norm_layer=kwargs.pop('norm_layer', None) or partial(nn.BatchNorm2d, **resolve_bn_args(kwargs)),
        act_layer=resolve_act_layer(kwargs, 'relu6'),
        se_layer=partial(attn_in_se_slot, attn_layer) if where == 'se' else None,
        **kwargs,
    )
    model = _create_effnet(variant, pretrained, **model_kwargs)
    if where == 'end':
        for block in model.modules():
            if type(block) in _END_ATTN:  # the same block, with its end attention
                block.__class__ = _END_ATTN[type(block)]
                last_norm = block.bn3 if isinstance(block, InvertedResidual) else block.bn2
                block.end_attn = attn_layer(last_norm.num_features, **dd)
    for m in model.modules():
        if hasattr(m, 'attn_info') and hasattr(m, 'reset_parameters'):
            m.reset_parameters()  # undo the blanket EfficientNet init where a paper initialises its block itself
    return model


for _name, (_attn, _arxiv, _where) in _MODELS.items():
    make_entrypoint(_name, __name__, _create, f'{_name} ({paper_id(_arxiv)}); see the docstring of {__name__}.')
