"""MobileViT (MobileViT-XXS / XS / S) on visattn's `MobileVitBlock`, registered with timm.

Paper: "MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision Transformer", Mehta, Rastegari,
ICLR 2022, arXiv:2110.02178 (https://arxiv.org/abs/2110.02178). Configurations from the paper's Table 4 (appendix
A) and the released code (apple/ml-cvnets, ``cvnets/models/classification/config/mobilevit.py`` and
``config/classification/mobilevit_{small,x_small,xx_small}.yaml``), as timm's ``mobilevit_s / xs / xxs``:

- stem: a 3×3 stride-2 conv (16 channels) -> BN -> Swish (stride 2);
- MV2 blocks (MobileNetV2 inverted residuals: 1×1 expansion conv -> BN -> Swish, 3×3 depthwise conv -> BN -> Swish,
  1×1 linear projection -> BN; a residual where the stride is 1 and the width is kept), expansion 4 (2 in XXS);
- five stages: MV2 (stride 1); MV2 ↓2 and two MV2 (stride 4); then at strides 8, 16 and 32 an MV2 ↓2 and a
  MobileViT block (`MobileVitBlock`: 3×3 and 1×1 convs, L transformer layers over the 2×2 patches, d channels,
  4 heads, MLP 2d, then the 1×1 projection and the 3×3 fusion conv) with L = 2, 4, 3;
- a 1×1 conv -> BN -> Swish to 4× the last width, global average pooling, a linear classifier.

Widths (Table 4), stages 1-5, with the transformer widths d:

- XXS (``mobilevit_xx_small``): 16, 24, 48 (d 64), 64 (d 80), 80 (d 96), final conv 320, expansion 2:
  1,272,024 parameters (the paper's 1.3M), 0.407 G multiply-adds at 256²;
- XS (``mobilevit_x_small``): 32, 48, 64 (d 96), 80 (d 120), 96 (d 144), final conv 384: 2,317,848 (2.3M),
  1.026 G;
- S (``mobilevit_small``): 32, 64, 96 (d 144), 128 (d 192), 160 (d 240), final conv 640: 5,578,632 (5.6M), 2.001 G.

The counts are exactly timm's for its ``mobilevit_xxs / xs / s`` (`checkpoint_filter_fn` loads their state dicts,
which for timm's pretrained tags are the released ml-cvnets weights converted, and gives their outputs), and so are
the multiply-adds (`visattn.zoo`'s count, equal for timm's models). The paper's only cost figure is "0.7 G FLOPs" for
MobileViT-XS (Table 3), without the input size or what is counted: ours at 224² without the attention's products
QKᵀ and AV is 0.703 G (with them 0.772 G; 1.026 G at 256²).

What differs from the released training setup: dropout. As the released configurations, ``drop_rate`` 0.1 before
the classifier and ``proj_drop_rate`` 0.1 (0.05 in XXS) after the attention and the MLP of the transformer layers, no
attention dropout; but the transformer layers are timm's ViT ``Block``, whose MLP also applies ``proj_drop_rate``
after its activation, where ml-cvnets' ``ffn_dropout`` is 0. This changes training only. Initialisation as ml-cvnets:
convs Kaiming normal (fan out) with zero biases, Linear truncated normal (std 0.02) with zero biases, norms 1 / 0.

Input sizes: the default is 256² (the paper's and timm's); any size runs. The stride-2 convs round up
(``⌈H/2⌉``); where a map side at a MobileViT block is not a multiple of the patch (2), the block resizes its map
bilinearly to the next multiple and back, as the released code and timm do (e.g. the 7×7 map of a 224² input at
stride 32). At multiples of 32 no resize happens.

The module layout: ``stem``; ``stages.i`` with ``downsample`` (the first MV2 of stages 2-5, stride 2; nothing in
stage 1), ``blocks`` (the other MV2 blocks, or the MobileViT block) and, in the last stage, ``final_conv`` (the 1×1
conv before the pool); ``head.fc``. ``forward_features`` returns the output of ``final_conv``
[B, num_features, H/32, W/32], as timm's; ``features_only=True`` and ``forward_intermediates`` give the five stage
outputs (NCHW, strides 2, 4, 8, 16, 32; the last after ``final_conv``, as timm's ``feature_info``).

Weights: timm's ``mobilevit_{xxs,xs,s}.cvnets_in1k`` (the released ImageNet-1k weights) load through
`checkpoint_filter_fn`: ``timm.create_model('mobilevit_small', pretrained=True,
pretrained_cfg_overlay=dict(file='model.safetensors'))`` with timm's file of ``mobilevit_s``.
"""

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.layers import ConvNormAct, DropPath
from timm.models import generate_default_cfgs
from torch import Tensor

from .._utils import check_int, check_prob
from ..layers.mobilevit import MobileVitBlock
from ._builder import build_staged, default_cfg, make_entrypoints
from ._staged import Stage, StagedNet, drop_path_rates

__all__ = ['InvertedResidual', 'MobileViT', 'MobileVitStage', 'checkpoint_filter_fn']


class InvertedResidual(nn.Module):
    """MobileNetV2's inverted residual (MV2) on [B, C, H, W]: 1×1 conv to ``expansion``·C -> BN -> act, k×k depthwise
    conv (``stride``) -> BN -> act, 1×1 conv to ``out_channels`` -> BN; plus the input where the stride is 1 and the
    width is kept.

    Args:
        channels: input channels C.
        out_channels: output channels.
        stride: of the depthwise conv (1 or 2).
        expansion: hidden width / C.
        kernel_size: of the depthwise conv (default 3).
        drop_path: stochastic depth of the residual branch (only where there is a residual).
        act_layer: activation (default SiLU, the paper's Swish).
        device, dtype: factory arguments.
    """

    def __init__(self, channels: int, out_channels: int, stride: int = 1, expansion: float = 4., kernel_size: int = 3,
                 drop_path: float = 0., act_layer: type[nn.Module] = nn.SiLU, device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        hidden = int(round(channels * expansion))
        self.has_skip = stride == 1 and channels == out_channels
        self.conv1_1x1 = ConvNormAct(channels, hidden, 1, act_layer=act_layer, **dd)
        self.conv2_kxk = ConvNormAct(hidden, hidden, kernel_size, stride=stride, groups=hidden, act_layer=act_layer,
                                     **dd)
        self.conv3_1x1 = ConvNormAct(hidden, out_channels, 1, apply_act=False, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. and self.has_skip else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv3_1x1(self.conv2_kxk(self.conv1_1x1(x)))
        if self.has_skip:
            y = x + self.drop_path(y)
        return y


class MobileVitStage(Stage):
    """A stage: an MV2 ↓2 (``downsample``, stages after the first), then ``blocks`` (MV2 blocks, or one MobileViT
    block), then ``final_conv`` (the 1×1 conv -> BN -> act before the pool, in the last stage; else nothing)."""

    def __init__(self, downsample: nn.Module, blocks: Sequence[nn.Module], final_conv: nn.Module | None = None) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)
        self.final_conv = nn.Identity() if final_conv is None else final_conv

    def forward(self, x: Tensor) -> Tensor:
        return self.final_conv(self._run_blocks(self.downsample(x)))


class MobileViT(StagedNet):
    """MobileViT (v1), timm's model interface.

    ``forward_intermediates`` / ``prune_intermediate_layers`` (`FeatureIntermediates`): the taps are the five stage
    outputs (strides 2, 4, 8, 16, 32; the last after the final 1×1 conv), NCHW; there is no final norm.

    Args:
        widths: output channels of the five stages.
        transformer_dims: d of the MobileViT blocks of stages 3, 4, 5.
        transformer_depths: transformer layers L of those blocks.
        final_channels: channels of the 1×1 conv before the pool (``num_features``).
        expansion: of the MV2 blocks.
        mv2_depths: MV2 blocks of stages 1 and 2.
        stem_channels: of the 3×3 stride-2 stem conv.
        patch_size: of the MobileViT blocks.
        num_heads: of their transformer layers.
        mlp_ratio: of their MLPs (hidden width / d).
        img_size: the default input size (any input runs).
        in_chans, num_classes, global_pool: timm's.
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after the attention and in the MLPs of the transformer layers.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth of the residual MV2 blocks and of the MobileViT blocks' transformer
            layers, growing linearly over the blocks from 0 (default 0: the released models have none).
        act_layer: activation everywhere (SiLU: the paper's Swish).
        device, dtype: factory arguments.
    """

    _group_stem = r'^stem'

    def __init__(
            self,
            widths: Sequence[int] = (32, 64, 96, 128, 160),
            transformer_dims: Sequence[int] = (144, 192, 240),
            transformer_depths: Sequence[int] = (2, 4, 3),
            final_channels: int = 640,
            expansion: float = 4.,
            mv2_depths: Sequence[int] = (1, 3),
            stem_channels: int = 16,
            patch_size: int = 2,
            num_heads: int = 4,
            mlp_ratio: float = 2.,
            img_size: int | tuple[int, int] = 256,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            drop_rate: float = 0.1,
            proj_drop_rate: float = 0.1,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            act_layer: type[nn.Module] = nn.SiLU,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if len(widths) != 5:
            raise ValueError(f'widths must give the channels of the 5 stages, got {list(widths)}')
        for name, value in (('transformer_dims', transformer_dims), ('transformer_depths', transformer_depths)):
            if len(value) != 3:
                raise ValueError(f'{name} must give one value per MobileViT block (3), got {list(value)}')
        if len(mv2_depths) != 2:
            raise ValueError(f'mv2_depths must give the MV2 blocks of stages 1 and 2, got {list(mv2_depths)}')
        for name, value in (('final_channels', final_channels), ('stem_channels', stem_channels)):
            check_int(name, value)
        for name, value in (('drop_rate', drop_rate), ('proj_drop_rate', proj_drop_rate),
                            ('attn_drop_rate', attn_drop_rate), ('drop_path_rate', drop_path_rate)):
            check_prob(name, value)
        self.img_size = img_size
        self.stem = ConvNormAct(in_chans, stem_channels, 3, stride=2, act_layer=act_layer, **dd)
        # stochastic depth grows linearly over the blocks (MV2 and MobileViT, in order; timm's ByobNet rule)
        depths = [mv2_depths[0], mv2_depths[1], 2, 2, 2]
        dpr = drop_path_rates(drop_path_rate, depths)
        stages, self.feature_info = [], []
        prev = stem_channels
        for i, width in enumerate(widths):
            rates = dpr[i]
            if i == 0:
                downsample: nn.Module = nn.Identity()
                blocks: list[nn.Module] = [
                    InvertedResidual(prev if j == 0 else width, width, 1, expansion, drop_path=rates[j], **dd)
                    for j in range(depths[0])]
            else:
                downsample = InvertedResidual(prev, width, 2, expansion, **dd)
                if i == 1:
                    blocks = [InvertedResidual(width, width, 1, expansion, drop_path=rates[j], **dd)
                              for j in range(1, depths[1])]
                else:
                    t = i - 2
                    blocks = [MobileVitBlock(
                        width, transformer_dim=transformer_dims[t], transformer_depth=transformer_depths[t],
                        patch_size=patch_size, num_heads=num_heads, mlp_ratio=mlp_ratio, attn_drop=attn_drop_rate,
                        drop=proj_drop_rate, drop_path=rates[1], act_layer=act_layer, **dd)]
            last = i == len(widths) - 1
            final_conv = ConvNormAct(width, final_channels, 1, act_layer=act_layer, **dd) if last else None
            stages.append(MobileVitStage(downsample, blocks, final_conv))
            self.feature_info.append(dict(num_chs=final_channels if last else width, reduction=2 ** (i + 1),
                                          module=f'stages.{i}'))
            prev = width
        self.stages = nn.Sequential(*stages)
        self._init_head(nn.Identity(), final_channels, in_chans, num_classes, global_pool, drop_rate, **dd)
        self.init_weights()

    def init_weights(self) -> None:
        """ml-cvnets' initialisation: convs Kaiming normal (fan out), Linear truncated normal (std 0.02), zero
        biases; BatchNorm and LayerNorm 1 / 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """None: the released recipe decays every parameter (``no_decay_bn_filter_bias: false``)."""
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=self._group_stem,
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^stages\.(\d+)\.final_conv', (99999,)),
            ])

    def _embed(self, x: Tensor) -> Tensor:
        return self.stem(x)


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: MobileViT) -> dict[str, Tensor]:
    """Map a timm MobileViT state dict (``mobilevit_xxs / xs / s``, ByobNet's layout) to this layout.

    ``stages.i.j.*`` -> ``stages.i.blocks.j.*`` in the first stage; in the others ``stages.i.0.*`` ->
    ``stages.i.downsample.*`` and ``stages.i.j.*`` -> ``stages.i.blocks.{j-1}.*``; ``final_conv.*`` ->
    ``stages.4.final_conv.*``. The names inside the blocks are the same (timm's ``BottleneckBlock`` ``conv1_1x1`` /
    ``conv2_kxk`` / ``conv3_1x1`` and ``MobileVitBlock``'s). A ``{'model': ...}`` or ``{'state_dict': ...}`` wrapper is
    unpacked; a state dict in this layout passes as is."""
    state_dict = state_dict.get('model', state_dict)
    state_dict = state_dict.get('state_dict', state_dict)
    if not any(k.startswith('final_conv.') for k in state_dict):
        return state_dict
    last = len(model.stages) - 1
    out = {}
    for key, value in state_dict.items():
        if m := re.match(r'stages\.(\d+)\.(\d+)\.(.*)', key):
            stage, index, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            if stage == 0:
                key = f'stages.0.blocks.{index}.{rest}'
            elif index == 0:
                key = f'stages.{stage}.downsample.{rest}'
            else:
                key = f'stages.{stage}.blocks.{index - 1}.{rest}'
        elif key.startswith('final_conv.'):
            key = f'stages.{last}.{key}'
        out[key] = value
    return out


_MODELS: dict[str, dict[str, Any]] = {
    'mobilevit_xx_small': dict(widths=(16, 24, 48, 64, 80), transformer_dims=(64, 80, 96), final_channels=320,
                               expansion=2., proj_drop_rate=0.05),
    'mobilevit_x_small': dict(widths=(32, 48, 64, 80, 96), transformer_dims=(96, 120, 144), final_channels=384),
    'mobilevit_small': dict(widths=(32, 64, 96, 128, 160), transformer_dims=(144, 192, 240), final_channels=640),
}
_ARXIV = '2110.02178'

default_cfgs = generate_default_cfgs({
    name: default_cfg(_ARXIV, input_size=(3, 256, 256), pool_size=(8, 8), crop_pct=0.9, interpolation='bicubic',
                      mean=(0., 0., 0.), std=(1., 1., 1.), first_conv='stem.conv', classifier='head.fc',
                      license='cvnets-license')
    for name in _MODELS
})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> MobileViT:
    return build_staged(MobileViT, variant, pretrained, _MODELS[variant], checkpoint_filter_fn,
                        default_out_indices=(0, 1, 2, 3, 4), **kwargs)


make_entrypoints(__name__, _create, dict.fromkeys(_MODELS, _ARXIV))
