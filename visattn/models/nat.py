"""Neighborhood Attention Transformers (NAT) and their dilated form (DiNAT), registered with timm.

Papers: "Neighborhood Attention Transformer", Hassani, Walton, Li, Li, Shi, CVPR 2023, arXiv:2204.07143;
"Dilated Neighborhood Attention Transformer", Hassani, Shi, 2022, arXiv:2209.15001. Configurations from the
papers' tables and the released code (SHI-Labs/Neighborhood-Attention-Transformer, ``classification/nat.py`` and
``dinat.py``):

- overlapping conv tokenizer: two 3×3 stride-2 convs (C/2 then C channels, no activation between them), then
  LayerNorm: stride 4;
- four stages of NAT layers (pre-norm: ``x + NA(LN(x))``, ``x + MLP(LN(x))``, GELU MLP), kernel 7, with a conv
  downsampler (3×3 stride-2 conv without bias doubling the channels, then LayerNorm) between stages;
- Mini: depths [3, 4, 6, 5], heads [2, 4, 8, 16], C = 64, MLP ratio 3, drop path 0.2;
  Tiny: depths [3, 4, 18, 5], the same heads, C = 64, ratio 3, drop path 0.2;
  Small: depths [3, 4, 18, 5], heads [3, 6, 12, 24], C = 96, ratio 2, drop path 0.3, layer scale 1e-5;
  Base: depths [3, 4, 18, 5], heads [4, 8, 16, 32], C = 128, ratio 2, drop path 0.5, layer scale 1e-5;
- DiNAT: the same models with the layers of each stage alternating dilation 1 and the stage's dilation, which
  the paper sizes to the feature map at the training resolution, ``feature // kernel_size``: [8, 4, 2, 1] at 224²
  (``dilations=[[1, 8, 1], [1, 4, 1, 4], [1, 2, ...], [1, 1, 1, 1, 1]]`` in the released code; at 384² the rule
  gives DiNAT-L-384's [13, 6, 3, 1]). ``img_size`` sets the resolution the dilations are sized for (default 224);
  ``dilations=`` (per stage, per layer) overrides them. The released ``dinat_small`` has no layer scale (NAT-Small
  has it); followed here, so that its checkpoint loads.

The layers work channels-last (NAT's layout: [B, H, W, C]) on `NeighborhoodAttnNHWC`, any input size: maps
smaller than ``kernel_size·dilation`` are zero-padded at the bottom/right before the qkv projection and cropped
after the attention, as NAT's released code (``pad_mode='mask'`` masks the padded keys instead).
``forward_features`` returns the normalised last map [B, H/32, W/32, C] (``output_fmt = 'NHWC'``, as timm's Swin);
``features_only=True`` and ``forward_intermediates`` give NCHW maps at strides 4, 8, 16 and 32.

The module layout is timm's (``stages.i.downsample`` opens stage i > 0, ``head.fc`` is the classifier);
`checkpoint_filter_fn` maps the released checkpoints (``levels.i.blocks`` / ``levels.i.downsample`` closing
level i, ``head``), which then load with ``pretrained_cfg_overlay=dict(file=...)``. The released weights are at
``https://shi-labs.com/projects/nat/checkpoints/CLS/nat_{mini,tiny,small,base}.pth`` and
``https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_{mini,tiny,small,base}_in1k_224.pth``.

Dropout names follow timm: ``drop_rate`` before the classifier, ``proj_drop_rate`` after the attention and in the
MLP (NAT's ``drop_rate``; NAT's dropout after the tokenizer is left out, it is 0 in every released model),
``attn_drop_rate`` on the attention weights.
"""

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, to_2tuple
from timm.models import generate_default_cfgs
from torch import Tensor

from ..layers.na import NeighborhoodAttnNHWC
from ._builder import build_checked, default_cfg, make_entrypoint, paper_id
from ._staged import Stage, StagedNet, drop_path_rates, rename_level_keys

__all__ = ['NAT', 'NATLayer', 'NATStage', 'checkpoint_filter_fn', 'dinat_dilations']


class ConvTokenizer(nn.Module):
    """NAT's overlapping tokenizer: two 3×3 stride-2 convs, then a norm over channels; NCHW in, NHWC out."""

    def __init__(self, in_chans: int, embed_dim: int, norm_layer: type[nn.Module] = nn.LayerNorm, device=None,
                 dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, 3, stride=2, padding=1, **dd),
            nn.Conv2d(embed_dim // 2, embed_dim, 3, stride=2, padding=1, **dd),
        )
        self.norm = norm_layer(embed_dim, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):
    """NAT's downsampler: a 3×3 stride-2 conv without bias doubling the channels, then a norm; NHWC in and out."""

    def __init__(self, dim: int, norm_layer: type[nn.Module] = nn.LayerNorm, device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.reduction = nn.Conv2d(dim, 2 * dim, 3, stride=2, padding=1, bias=False, **dd)
        self.norm = norm_layer(2 * dim, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class NATLayer(nn.Module):
    """A NAT layer on [B, H, W, C]: ``x + γ1·NA(LN(x))``, then ``x + γ2·MLP(LN(x))`` (γ: layer scale, if set)."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            kernel_size: int = 7,
            dilation: int = 1,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            qk_scale: float | None = None,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            layer_scale: float | None = None,
            pad_mode: str = 'zeros',
            act_layer: type[nn.Module] = nn.GELU,
            norm_layer: type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = NeighborhoodAttnNHWC(
            dim, num_heads=num_heads, kernel_size=kernel_size, dilation=dilation, qkv_bias=qkv_bias,
            qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=proj_drop, pad_mode=pad_mode, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        if layer_scale is not None:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale), **dd))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale), **dd))
        else:
            self.register_parameter('gamma1', None)
            self.register_parameter('gamma2', None)

    def forward(self, x: Tensor) -> Tensor:
        y = self.attn(self.norm1(x))
        if self.gamma1 is not None:
            y = self.gamma1 * y
        x = x + self.drop_path(y)
        y = self.mlp(self.norm2(x))
        if self.gamma2 is not None:
            y = self.gamma2 * y
        return x + self.drop_path(y)


class NATStage(Stage):
    """A stage: the downsampler (stages after the first), then its NAT layers; [B, H, W, C] in and out."""

    def __init__(
            self,
            dim: int,
            depth: int,
            num_heads: int,
            dilations: Sequence[int],
            drop_path: Sequence[float],
            downsample: bool,
            norm_layer: type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
            **layer_kwargs: Any,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.downsample = ConvDownsampler(dim // 2, norm_layer, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            NATLayer(dim, num_heads, dilation=dilations[i], drop_path=drop_path[i], norm_layer=norm_layer, **dd,
                     **layer_kwargs)
            for i in range(depth)])


def dinat_dilations(depths: Sequence[int], img_size: int | tuple[int, int] = 224,
                    kernel_size: int = 7) -> list[list[int]]:
    """DiNAT's dilations: in stage i the layers alternate 1 and ``max(1, f_i // kernel_size)``, ``f_i`` the side of
    the stage's map at ``img_size`` (the smaller side; 56, 28, 14, 7 at 224²: [8, 4, 2, 1])."""
    size = min(to_2tuple(img_size))
    out = []
    for i, depth in enumerate(depths):
        feat = math.ceil(size / 2 ** (i + 2))  # the stride-2 convs round up
        out.append([1 if j % 2 == 0 else max(1, feat // kernel_size) for j in range(depth)])
    return out


class NAT(StagedNet):
    """Neighborhood Attention Transformer (DiNAT with ``dilations``), timm's model interface.

    ``forward_intermediates`` / ``prune_intermediate_layers`` (`FeatureIntermediates`): the taps are the four stage
    outputs (strides 4, 8, 16, 32), returned NCHW (``output_fmt='NCHW'`` only); ``norm`` normalises the last one.
    ``forward_features`` returns the normalised last map [B, H/32, W/32, num_features] (`StagedNet`).

    Args:
        depths: layers per stage.
        num_heads: heads per stage.
        embed_dim: channels of the first stage (doubled at every stage).
        mlp_ratio: MLP hidden width / channels.
        kernel_size: neighbourhood size k (odd).
        dilations: per stage, the dilation of each layer (default: 1 everywhere, NAT).
        img_size: accepted for timm (any input size works); `dinat_dilations` sizes DiNAT's dilations with it.
        in_chans, num_classes, global_pool: timm's.
        qkv_bias, qk_scale: of the attention.
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after the attention's projection and in the MLP.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth, growing linearly over the layers from 0.
        layer_scale: initial value of the layer-scale weights (None: no layer scale).
        pad_mode: maps smaller than ``k·dilation``: ``'zeros'`` (NAT's released code) or ``'mask'``.
        norm_layer: norm over channels.
        device, dtype: factory arguments.
    """

    _fi_nhwc = True

    def __init__(
            self,
            depths: Sequence[int] = (3, 4, 6, 5),
            num_heads: Sequence[int] = (2, 4, 8, 16),
            embed_dim: int = 64,
            mlp_ratio: float = 3.,
            kernel_size: int = 7,
            dilations: Sequence[Sequence[int]] | None = None,
            img_size: int | tuple[int, int] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            qkv_bias: bool = True,
            qk_scale: float | None = None,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.2,
            layer_scale: float | None = None,
            pad_mode: str = 'zeros',
            norm_layer: type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        num_stages = len(depths)
        if len(num_heads) != num_stages:
            raise ValueError(f'num_heads must give one value per stage ({num_stages}), got {list(num_heads)}')
        dilations = [[1] * d for d in depths] if dilations is None else [list(d) for d in dilations]
        if [len(d) for d in dilations] != list(depths):
            raise ValueError(f'dilations must give one value per layer of each stage (depths {list(depths)}), '
                             f'got {dilations}')
        self.img_size = to_2tuple(img_size)
        self.dilations = dilations
        dims = [int(embed_dim * 2 ** i) for i in range(num_stages)]
        self.patch_embed = ConvTokenizer(in_chans, embed_dim, norm_layer, **dd)
        dpr = drop_path_rates(drop_path_rate, depths)  # NAT's linspace(0, rate, layers)
        stages, self.feature_info = [], []
        for i in range(num_stages):
            stages.append(NATStage(
                dims[i], depths[i], num_heads[i], dilations[i], dpr[i], downsample=i > 0, norm_layer=norm_layer,
                kernel_size=kernel_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, layer_scale=layer_scale, pad_mode=pad_mode, **dd))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self._init_head(norm_layer(dims[-1], **dd), dims[-1], in_chans, num_classes, global_pool, drop_rate, **dd)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """NAT's: Linear layers trunc-normal (std 0.02) with zero bias, LayerNorm 1 / 0; convs and ``rpb`` (trunc
        normal, std 0.02) as built."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The relative position biases (NAT's ``no_weight_decay_keywords``)."""
        return {n for n, _ in self.named_parameters() if n.endswith('.rpb')}


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: NAT) -> dict[str, Tensor]:
    """Map a released NAT/DiNAT checkpoint to this layout: ``levels.i.blocks.*`` -> ``stages.i.blocks.*``,
    ``levels.i.downsample.*`` (closing level i) -> ``stages.{i+1}.downsample.*``, ``head.*`` -> ``head.fc.*``. A
    ``{'model': ...}`` or ``{'state_dict': ...}`` wrapper is unpacked; a state dict in this layout passes as is."""
    return rename_level_keys(state_dict, 'levels')


_SIZES: dict[str, dict[str, Any]] = {
    'mini': dict(depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), embed_dim=64, mlp_ratio=3., drop_path_rate=0.2),
    'tiny': dict(depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), embed_dim=64, mlp_ratio=3., drop_path_rate=0.2),
    'small': dict(depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), embed_dim=96, mlp_ratio=2., drop_path_rate=0.3,
                  layer_scale=1e-5),
    'base': dict(depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), embed_dim=128, mlp_ratio=2., drop_path_rate=0.5,
                 layer_scale=1e-5),
}
_MODELS: dict[str, tuple[dict[str, Any], str]] = {
    **{f'nat_{size}': (args, '2204.07143') for size, args in _SIZES.items()},
    **{f'dinat_{size}': (args, '2209.15001') for size, args in _SIZES.items()},
}
_MODELS['dinat_small'] = ({k: v for k, v in _SIZES['small'].items() if k != 'layer_scale'}, '2209.15001')

default_cfgs = generate_default_cfgs({
    name: default_cfg(arxiv, interpolation='bicubic', first_conv='patch_embed.proj.0', classifier='head.fc',
                      license='mit')
    for name, (_, arxiv) in _MODELS.items()
})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> NAT:
    args = dict(_MODELS[variant][0], **kwargs)
    if variant.startswith('dinat_') and args.get('dilations') is None:
        args['dilations'] = dinat_dilations(args['depths'], args.get('img_size', 224), args.get('kernel_size', 7))
    out_indices = args.pop('out_indices', (0, 1, 2, 3))
    return build_checked(NAT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                         feature_cfg=dict(feature_cls='getter', out_indices=out_indices), **args)


for _name, (_args, _arxiv) in _MODELS.items():
    make_entrypoint(_name, __name__, _create, f'{_name} ({paper_id(_arxiv)}); see the docstring of {__name__}.')
