"""Global Filter Networks (GFNet), isotropic and hierarchical, registered with timm.

Paper: "Global Filter Networks for Image Classification", Rao, Zhao, Zhu, Lu, Zhou, NeurIPS 2021, arXiv:2107.00645.
Configurations from the released code (raoyongming/GFNet, ``gfnet.py`` and ``main_gfnet.py``):

- isotropic GFNet: a 16×16 stride-16 patch embedding (14×14 tokens at 224², no class token), a learnable absolute
  position embedding, blocks ``x + MLP(LN(GF(LN(x))))`` (the released ``Block``: one residual around the global
  filter and the GELU MLP, ratio 4), a final LayerNorm and global average pooling; LayerNorm eps 1e-6;
  Ti: C = 256, 12 blocks; XS: C = 384, 12 blocks; S: C = 384, 19 blocks, drop path 0.15;
  B: C = 512, 19 blocks, drop path 0.25 (Ti and XS: no drop path, as the released code builds them);
- hierarchical GFNet-H: a 4×4 stride-4 patch embedding with a position embedding at stride 4, four stages of
  the block with layer scale (``x + γ·MLP(LN(GF(LN(x))))``, the released ``BlockLayerScale``), a 2×2 stride-2 conv
  (no norm) opening stages 2-4; H-Ti: C = [64, 128, 256, 512], depths [3, 3, 10, 3], γ₀ = 1e-3, drop path 0.1;
  H-S: C = [96, 192, 384, 768], depths [3, 3, 10, 3], γ₀ = 1e-5, drop path 0.2; H-B: C = [96, 192, 384, 768],
  depths [3, 3, 27, 3], γ₀ = 1e-6, drop path 0.4.

Parameters at 224², 1000 classes (in brackets the paper's Table 2 / the released README): gfnet_ti 7.51M (7M: the
released Ti configuration counts 7.51M, the paper prints 7M), gfnet_xs 15.99M (16M), gfnet_s 24.87M (25M), gfnet_b
43.12M (43M), gfnet_h_ti 15.09M (15M), gfnet_h_s 32.16M (32M), gfnet_h_b 53.74M (54M).

The global filters are visattn's `GlobalFilterNHWC` (`visattn.layers.gfnet`), built for the token grid at
``img_size`` (``complex_weight`` [h, w // 2 + 1, C, 2]); the position embedding is built for the same grid. Any
input whose sides are multiples of the total stride (16, or 32 for GFNet-H) works: on another grid the filters are
interpolated as the released code does when it fine-tunes at another resolution (bicubic, ``align_corners=True``,
in the frequency domain) and the position embedding as it does there too (bicubic, ``align_corners=False``), both at
every forward (the released model takes only its ``img_size``). ``forward_features`` returns the normalised last
map [B, H/s, W/s, C] (``output_fmt = 'NHWC'``); ``features_only=True`` and ``forward_intermediates`` give NCHW
maps: the isotropic models the token map at stride 16 after any block (``feature_info`` lists every block;
``features_only`` takes the last block of each quarter by default, ``out_indices=`` picks others), GFNet-H the four
stage outputs at strides 4, 8, 16 and 32.

Differences from the released code: the filter returns its input's dtype (the released layer returns float32 under
autocast); the dropout names follow timm (``drop_rate`` before the classifier, the released ``dropcls``;
``proj_drop_rate`` in the MLP and ``pos_drop_rate`` after the position embedding, both the released ``drop_rate``).
The module layout keeps the released names (``patch_embed.proj``, ``pos_embed``, ``blocks.i.{norm1, filter, norm2,
mlp, gamma}``, ``norm``) except the classifier, ``head.fc``, and, for GFNet-H, ``stages.i.{downsample, blocks}``;
`checkpoint_filter_fn` maps the released checkpoints (Tsinghua Cloud / Google Drive links in the released README) and
resizes their position embedding and filters to the model's ``img_size``; they then load with
``pretrained_cfg_overlay=dict(file=...)``.
"""

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerNorm, Mlp, PatchEmbed, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs
from torch import Tensor

from ..layers.gfnet import GlobalFilterNHWC, resize_global_filter
from ._builder import build_checked, default_cfg, make_entrypoint, paper_id
from ._staged import ClassifierNet, Stage, drop_path_rates

__all__ = ['GFNet', 'GFNetBlock', 'GFNetH', 'checkpoint_filter_fn']

_ARXIV = '2107.00645'


class GFNetBlock(nn.Module):
    """GFNet's block on [B, H, W, C]: ``x + γ·MLP(LN(GF(LN(x))))`` (γ: layer scale, if set; the released ``Block`` /
    ``BlockLayerScale``). ``filter_layer(dim, feat_size=, device=, dtype=)`` builds the token mixer GF on
    [B, H, W, C] (default `GlobalFilterNHWC`; AFNONet passes its AFNO mixer)."""

    def __init__(
            self,
            dim: int,
            feat_size: tuple[int, int],
            mlp_ratio: float = 4.,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            layer_scale: float | None = None,
            act_layer: type[nn.Module] = nn.GELU,
            norm_layer: type[nn.Module] = LayerNorm,
            filter_layer: Callable[..., nn.Module] = GlobalFilterNHWC,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(dim, **dd)
        self.filter = filter_layer(dim, feat_size=feat_size, **dd)
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        if layer_scale is not None:
            self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale), **dd))
        else:
            self.register_parameter('gamma', None)

    def forward(self, x: Tensor) -> Tensor:
        y = self.mlp(self.norm2(self.filter(self.norm1(x))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + self.drop_path(y)


def _add_pos_embed(x: Tensor, pos_embed: Tensor, grid: list[int]) -> Tensor:
    """``x`` [B, H, W, C] plus ``pos_embed`` [1, grid_h·grid_w, C], resized bicubically to (H, W) where it differs
    (the released fine-tuning code's resize)."""
    H, W = x.shape[1], x.shape[2]
    pos = resample_abs_pos_embed(pos_embed, [H, W], old_size=grid, num_prefix_tokens=0, antialias=False)
    return x + pos.reshape(1, H, W, -1)


def _init_weights(m: nn.Module) -> None:
    """The released init: Linear trunc-normal (std 0.02) with zero bias, LayerNorm 1 / 0; convs as built, filters
    N(0, 0.02²) (`GlobalFilter.reset_parameters`)."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class _GFNetBase(ClassifierNet):
    """What `GFNet` and `GFNetH` share: the embedding (patches plus the resized position embedding, in the stem
    group) and timm's interface on the NHWC maps (`ClassifierNet`; intermediates ``'NCHW'`` or ``'NHWC'``)."""

    _fi_nhwc = True
    _fi_formats = ('NCHW', 'NHWC')
    _group_stem = r'^patch_embed|^pos_embed'

    def _embed(self, x: Tensor) -> Tensor:
        return self.pos_drop(_add_pos_embed(self.patch_embed(x), self.pos_embed, self.grid_size))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {'pos_embed'}


def _check_img_size(img_size: tuple[int, int], stride: int) -> None:
    if img_size[0] % stride or img_size[1] % stride or min(img_size) < stride:
        raise ValueError(f'img_size must be a multiple of {stride} on each side, got {img_size}')


class GFNet(_GFNetBase):
    """The isotropic GFNet (Ti/XS/S/B), timm's model interface.

    ``forward_intermediates`` / ``prune_intermediate_layers`` (`FeatureIntermediates`): the taps are the token maps
    after every block (stride ``patch_size``), ``output_fmt`` ``'NCHW'`` or ``'NHWC'``; ``norm`` normalises each.

    Args:
        img_size: the training resolution; the filters and the position embedding are built for its token grid
            (any input whose sides are multiples of ``patch_size`` works).
        patch_size: side of the patches (the stride).
        in_chans, num_classes, global_pool: timm's (``'avg'`` or ``''``).
        embed_dim: channels C.
        depth: number of blocks.
        mlp_ratio: MLP hidden width / C.
        drop_rate: dropout before the classifier.
        pos_drop_rate: dropout after the position embedding.
        proj_drop_rate: dropout in the MLP.
        drop_path_rate: stochastic depth, growing linearly over the blocks from 0.
        layer_scale: initial value of the layer-scale weights (None: none, as the released isotropic models).
        norm_layer: norm over channels (default LayerNorm, eps 1e-6).
        filter_layer: the token mixer on [B, H, W, C], ``filter_layer(dim, feat_size=, device=, dtype=)`` (default
            `GlobalFilterNHWC`).
        device, dtype: factory arguments.
    """

    _fi_isotropic = True

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 384,
            depth: int = 12,
            mlp_ratio: float = 4.,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            layer_scale: float | None = None,
            norm_layer: type[nn.Module] = LayerNorm,
            filter_layer: Callable[..., nn.Module] = GlobalFilterNHWC,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.img_size = to_2tuple(img_size)
        _check_img_size(self.img_size, patch_size)
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(self.img_size, patch_size, in_chans, embed_dim, output_fmt='NHWC',
                                      strict_img_size=False, **dd)
        self.grid_size = [self.patch_embed.grid_size[0], self.patch_embed.grid_size[1]]
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], embed_dim, **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = drop_path_rates(drop_path_rate, [depth])[0]
        self.blocks = nn.Sequential(*[
            GFNetBlock(embed_dim, tuple(self.grid_size), mlp_ratio, proj_drop=proj_drop_rate, drop_path=dpr[i],
                       layer_scale=layer_scale, norm_layer=norm_layer, filter_layer=filter_layer, **dd)
            for i in range(depth)])
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f'blocks.{i}') for i in range(depth)]
        self._init_head(norm_layer(embed_dim, **dd), embed_dim, in_chans, num_classes, global_pool, drop_rate, **dd)
        self.grad_checkpointing = False
        trunc_normal_(self.pos_embed, std=.02)
        self.apply(_init_weights)


class Downsample(nn.Module):
    """GFNet-H's downsampler (the released ``DownLayer``): a 2×2 stride-2 conv, no norm; NHWC in and out."""

    def __init__(self, dim_in: int, dim_out: int, device=None, dtype=None) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim_in, dim_out, 2, stride=2, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class GFNetStage(Stage):
    """A GFNet-H stage: the downsampler (stages after the first), then its blocks; [B, H, W, C] in and out."""

    def __init__(self, dim_in: int, dim: int, depth: int, feat_size: tuple[int, int], drop_path: Sequence[float],
                 downsample: bool, device=None, dtype=None, **block_kwargs: Any) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.downsample = Downsample(dim_in, dim, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            GFNetBlock(dim, feat_size, drop_path=drop_path[i], **dd, **block_kwargs) for i in range(depth)])


class GFNetH(_GFNetBase):
    """The hierarchical GFNet-H (Ti/S/B), timm's model interface.

    ``forward_intermediates`` / ``prune_intermediate_layers`` (`FeatureIntermediates`): the taps are the four stage
    outputs (strides 4, 8, 16, 32), ``output_fmt`` ``'NCHW'`` or ``'NHWC'``; ``norm`` normalises the last one.

    Args:
        img_size: the training resolution; the filters and the position embedding are built for the maps at it
            (strides 4, 8, 16, 32; any input whose sides are multiples of 32 works).
        in_chans, num_classes, global_pool: timm's (``'avg'`` or ``''``).
        embed_dims: channels per stage.
        depths: blocks per stage.
        mlp_ratio: MLP hidden width / channels.
        drop_rate: dropout before the classifier.
        pos_drop_rate: dropout after the position embedding.
        proj_drop_rate: dropout in the MLP.
        drop_path_rate: stochastic depth, growing linearly over all blocks from 0.
        layer_scale: initial value of the layer-scale weights (None: no layer scale, the released
            ``no_layerscale``).
        norm_layer: norm over channels (default LayerNorm, eps 1e-6).
        device, dtype: factory arguments.
    """

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            depths: Sequence[int] = (3, 3, 10, 3),
            mlp_ratio: float = 4.,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.1,
            layer_scale: float | None = 1e-3,
            norm_layer: type[nn.Module] = LayerNorm,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        num_stages = len(depths)
        if len(embed_dims) != num_stages:
            raise ValueError(f'embed_dims must give one value per stage ({num_stages}), got {list(embed_dims)}')
        self.img_size = to_2tuple(img_size)
        _check_img_size(self.img_size, 4 * 2 ** (num_stages - 1))
        self.patch_embed = PatchEmbed(self.img_size, 4, in_chans, embed_dims[0], output_fmt='NHWC',
                                      strict_img_size=False, **dd)
        self.grid_size = [self.patch_embed.grid_size[0], self.patch_embed.grid_size[1]]
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], embed_dims[0], **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = drop_path_rates(drop_path_rate, depths)
        stages, self.feature_info = [], []
        for i in range(num_stages):
            feat = (self.grid_size[0] // 2 ** i, self.grid_size[1] // 2 ** i)
            stages.append(GFNetStage(
                embed_dims[max(i - 1, 0)], embed_dims[i], depths[i], feat, dpr[i], downsample=i > 0,
                mlp_ratio=mlp_ratio, proj_drop=proj_drop_rate, layer_scale=layer_scale, norm_layer=norm_layer, **dd))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self._init_head(norm_layer(embed_dims[-1], **dd), embed_dims[-1], in_chans, num_classes, global_pool,
                        drop_rate, **dd)
        trunc_normal_(self.pos_embed, std=.02)
        self.apply(_init_weights)


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: GFNet | GFNetH) -> dict[str, Tensor]:
    """Map a released GFNet / GFNet-H checkpoint to this layout and to the model's ``img_size``.

    ``head.*`` -> ``head.fc.*``; GFNet-H also ``patch_embed.0.*`` -> ``patch_embed.*``, ``patch_embed.i.*`` (the
    downsampler opening stage i) -> ``stages.i.downsample.*``, ``blocks.i.j.*`` -> ``stages.i.blocks.j.*``. A
    ``pos_embed`` or ``complex_weight`` sized for another resolution is resized as the released fine-tuning code
    does (bicubic; the filters with ``align_corners=True``). A ``{'model': ...}`` wrapper is unpacked; a state dict
    in this layout passes with only the resizing.
    """
    state_dict = state_dict.get('model', state_dict)
    hierarchical = isinstance(model, GFNetH)
    out = {}
    for key, value in state_dict.items():
        if key.startswith('head.') and not key.startswith('head.fc.'):
            key = 'head.fc.' + key[len('head.'):]
        elif hierarchical:
            m = re.match(r'patch_embed\.(\d+)\.(.*)', key)
            if m:
                i = int(m.group(1))
                key = f'patch_embed.{m.group(2)}' if i == 0 else f'stages.{i}.downsample.{m.group(2)}'
            m = re.match(r'blocks\.(\d+)\.(\d+)\.(.*)', key)
            if m:
                key = f'stages.{m.group(1)}.blocks.{m.group(2)}.{m.group(3)}'
        if key == 'pos_embed' and value.shape != model.pos_embed.shape:
            old = math.isqrt(value.shape[1])
            value = resample_abs_pos_embed(value, model.grid_size, old_size=[old, old], num_prefix_tokens=0,
                                           antialias=False)
        elif key.endswith('.complex_weight'):
            layer = model.get_submodule(key[:-len('.complex_weight')])
            if value.shape != layer.complex_weight.shape:
                value = resize_global_filter(value, *layer.feat_size)
        out[key] = value
    return out


_ISOTROPIC: dict[str, dict[str, Any]] = {
    'gfnet_ti': dict(embed_dim=256, depth=12),
    'gfnet_xs': dict(embed_dim=384, depth=12),
    'gfnet_s': dict(embed_dim=384, depth=19, drop_path_rate=0.15),
    'gfnet_b': dict(embed_dim=512, depth=19, drop_path_rate=0.25),
}
_HIERARCHICAL: dict[str, dict[str, Any]] = {
    'gfnet_h_ti': dict(embed_dims=(64, 128, 256, 512), depths=(3, 3, 10, 3), drop_path_rate=0.1, layer_scale=1e-3),
    'gfnet_h_s': dict(embed_dims=(96, 192, 384, 768), depths=(3, 3, 10, 3), drop_path_rate=0.2, layer_scale=1e-5),
    'gfnet_h_b': dict(embed_dims=(96, 192, 384, 768), depths=(3, 3, 27, 3), drop_path_rate=0.4, layer_scale=1e-6),
}

default_cfgs = generate_default_cfgs({
    name: default_cfg(_ARXIV, pool_size=(14, 14) if name in _ISOTROPIC else (7, 7), crop_pct=0.9,
                      interpolation='bicubic', first_conv='patch_embed.proj', classifier='head.fc', license='mit')
    for name in (*_ISOTROPIC, *_HIERARCHICAL)
})


def _quarter_ends(depth: int) -> tuple[int, ...]:
    """The last block of each quarter of ``depth`` blocks (12: (2, 5, 8, 11))."""
    return tuple(sorted({max(0, math.ceil(depth * q / 4) - 1) for q in range(1, 5)}))


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> GFNet | GFNetH:
    if variant in _ISOTROPIC:
        args = dict(_ISOTROPIC[variant], **kwargs)
        cls, out_indices = GFNet, args.pop('out_indices', _quarter_ends(args['depth']))
    else:
        args = dict(_HIERARCHICAL[variant], **kwargs)
        cls, out_indices = GFNetH, args.pop('out_indices', (0, 1, 2, 3))
    return build_checked(cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                         feature_cfg=dict(feature_cls='getter', out_indices=out_indices), **args)


for _name in (*_ISOTROPIC, *_HIERARCHICAL):
    make_entrypoint(_name, __name__, _create, f'{_name} ({paper_id(_ARXIV)}); see the docstring of {__name__}.')
