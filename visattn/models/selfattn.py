"""ResNet-50s whose bottleneck 3×3 convs are self-attention-like layers, as in their papers' ImageNet tables.

Both are timm ``ResNet``-50s (7×7 conv stem, 1×1 strided-conv shortcuts, depths [3, 4, 6, 3]) with the 3×3 conv
``conv2`` of chosen bottlenecks replaced; the batch norm after it is kept (timm's module names, so a plain ResNet-50
checkpoint loads with ``strict=False``). Any input size works (64×64 in the tests, 224² as the papers).

- ``lambda_resnet50``: the LambdaNetwork ResNet-50 of "LambdaNetworks: Modeling Long-Range Interactions Without
  Attention" (arXiv:2102.08602), its Table 3 (lambda layer vs attention on ImageNet, 15.0M parameters, 78.4% top-1):
  every 3×3 conv of the 16 bottlenecks (c2-c5) is a lambda layer with k = 16, h = 4, u = 1 and a 23×23 lambda
  convolution; a stride-2 block downsamples by a 3×3 average pooling with stride 2 after the layer. 14,995,592
  parameters (15.0M). The paper's LambdaResNets of its scaling study are hybrids (lambda layers in c4/c5 of a
  ResNet-RS); timm's ``lambda_resnet50ts`` is timm's own variant.
- ``botnet50``: BoT50 of "Bottleneck Transformers for Visual Recognition" (arXiv:2101.11605), its Table 1: ResNet-50
  whose three c5 bottlenecks use all-to-all multi-head self-attention (4 heads, 2-D relative position logits) instead
  of the 3×3 conv, the first one followed by a 2×2 average pooling with stride 2. The relative tables are sized for
  ``img_size`` (default 224: 14×14 for the first c5 block, 7×7 for the others; other sizes clip the offsets):
  20,852,008 parameters (the paper prints 20.8M, and 25.5M for ResNet-50's 25,557,032). timm's ``botnet50ts_256``
  is timm's own variant (tiered stem, SiLU, fixed 256² input).
- ``cotnet50``: CoTNet-50 of "Contextual Transformer Networks for Visual Recognition" (arXiv:2107.12292): every 3×3
  conv of the 16 bottlenecks is a CoT block (k = 3, the released ``CotLayer``'s defaults); a stride-2 block
  average-pools 3×3 with stride 2 in front of it, as the released bottleneck's ``avd``. 22,229,968 parameters (the
  paper's table: 22.2M, 3.3 GFLOPs).
- ``acmix_resnet50``: the ACmix ResNet-50 of "On the Integration of Self-Attention and Convolution"
  (arXiv:2111.14556), as the released ``ResNet_ImageNet.py``: every 3×3 conv of the bottlenecks is an ACmix module
  (attention window 7, 4 heads, shift kernel 3) with the conv's stride: 18,337,752 parameters (the paper's table was
  not checked).
"""

from __future__ import annotations

import math
from typing import Any

from timm.models import generate_default_cfgs
from timm.models.resnet import Bottleneck

from .._utils import bind_defaults
from ..layers.acmix import ACmix
from ..layers.bottleneck import BottleneckAttn
from ..layers.cot import ContextualTransformer
from ..layers.lambda_layer import LambdaLayer
from ._builder import build_checked, default_cfg, make_entrypoint
from .local import SasaBottleneck
from .resnet import AttnResNet

__all__ = ['SelfAttnResNet', 'cot_layer']


class SelfAttnResNet(AttnResNet):
    """A timm ``ResNet`` whose `BottleneckAttn` layers get relative tables sized for their feature size at
    ``img_size``.

    Args:
        block, layers: bottleneck class (or one per stage) and stage depths.
        img_size: the input size the relative tables of `BottleneckAttn` layers are sized for (default 224).
        **kwargs: `AttnResNet` / timm ``ResNet`` arguments (``num_classes``, ``block_args``, ``device``, ...).
    """

    def __init__(self, block: Any, layers: tuple[int, ...], *, img_size: int = 224, **kwargs: Any) -> None:
        if kwargs.get('output_stride', 32) != 32:
            raise ValueError(f"output_stride must be 32 for self-attention ResNets, got {kwargs['output_stride']}")
        super().__init__(block, layers, **kwargs)
        dd = dict(device=kwargs.get('device'), dtype=kwargs.get('dtype'))
        size = math.ceil(img_size / 4)  # the input of layer1
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for blk in stage:
                attn = blk.conv2
                if isinstance(attn, BottleneckAttn):
                    blk.conv2 = BottleneckAttn(
                        attn.channels, attn.out_channels, feat_size=size, stride=attn.stride,
                        num_heads=attn.num_heads, dim_head=attn.dim_head_qk, qkv_bias=attn.qkv.bias is not None,
                        scale_pos_embed=attn.scale_pos_embed, **dd)
                    stride = attn.stride
                else:
                    stride = getattr(attn, 'stride', 1)
                    stride = stride[0] if isinstance(stride, tuple) else stride
                size = math.ceil(size / stride)


def cot_layer(channels: int, out_channels: int, **kwargs: Any) -> ContextualTransformer:
    """A CoT block in the place of a ``channels`` -> ``out_channels`` 3×3 conv (CoT keeps the width)."""
    if out_channels != channels:
        raise ValueError(f'a CoT block keeps its width: out_channels must equal channels={channels}, '
                         f'got {out_channels}')
    return ContextualTransformer(channels, **kwargs)


_LAMBDA_BLOCK = bind_defaults(SasaBottleneck, 'Lambda', spatial_layer=LambdaLayer)
_BOT_BLOCK = bind_defaults(SasaBottleneck, 'BoT', spatial_layer=BottleneckAttn)
_COT_BLOCK = bind_defaults(SasaBottleneck, 'CoT', spatial_layer=cot_layer)
_ACMIX_BLOCK = bind_defaults(SasaBottleneck, 'ACmix', spatial_layer=ACmix)

_MODELS: dict[str, tuple[dict[str, Any], str]] = {
    'lambda_resnet50': (dict(block=_LAMBDA_BLOCK, layers=(3, 4, 6, 3)), '2102.08602'),
    'botnet50': (dict(block=(Bottleneck, Bottleneck, Bottleneck, _BOT_BLOCK), layers=(3, 4, 6, 3)), '2101.11605'),
    'cotnet50': (dict(block=_COT_BLOCK, layers=(3, 4, 6, 3)), '2107.12292'),
    'acmix_resnet50': (dict(block=_ACMIX_BLOCK, layers=(3, 4, 6, 3)), '2111.14556'),
}

default_cfgs = generate_default_cfgs({name: default_cfg(arxiv) for name, (_, arxiv) in _MODELS.items()})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> SelfAttnResNet:
    return build_checked(SelfAttnResNet, variant, pretrained, **dict(_MODELS[variant][0], **kwargs))


for _name, (_args, _arxiv) in _MODELS.items():
    make_entrypoint(_name, __name__, _create, f'{_name} (arXiv:{_arxiv}); see the docstring of {__name__}.')
