"""PoolFormer (S12 / S24 / S36 / M36 / M48) on visattn's ``poolformer`` block, registered with timm.

Paper: "MetaFormer Is Actually What You Need for Vision", Yu, Luo, Zhou, Si, Zhou, Wang, Feng, Yan, CVPR 2022,
arXiv:2111.11418 (https://arxiv.org/abs/2111.11418). Configurations from the paper's Table 1 and the released code
(sail-sg/poolformer, ``models/poolformer.py``), as timm's ``poolformer_{s12,s24,s36,m36,m48}``
(``timm/models/metaformer.py``). The names are ``poolformerv1_*``: timm registers ``poolformer_*`` itself.

The MetaFormer block, on [B, C, H, W] maps (pre-norm, layer scale γ, stochastic depth):

    x = x + DropPath(γ1 · PoolMixer(GN(x))),   x = x + DropPath(γ2 · MLP(GN(x)))

`PoolMixer` is visattn's ``poolformer`` block (``avgpool_3×3(x) - x``, stride 1, borders averaged over the pixels
inside the map), used as it is; GN is GroupNorm with one group (timm's `GroupNorm1`: each sample normalised over C,
H and W together); the MLP is two 1×1 convs, C -> 4C -> C, with GELU between them. The network:

- stem: a 7×7 stride-4 conv (padding 2) to C₁ channels, no norm;
- four stages of blocks, each stage after the first opened by a 3×3 stride-2 conv (padding 1) to its width, no
  norm (strides 4, 8, 16, 32);
- final norm, global average pooling, linear classifier.

The variants (depths; widths; initial layer scale; drop-path rate: parameters at 1000 classes, the paper's Table 1
figures at 224²):

- ``poolformerv1_s12``: 2-2-6-2; 64-128-320-512; 1e-5; 0.1: 11,915,176 parameters, 1.812 G multiply-adds (12M,
  1.8G);
- ``poolformerv1_s24``: 4-4-12-4; 64-128-320-512; 1e-5; 0.1: 21,388,968, 3.392 G (21M, 3.4G);
- ``poolformerv1_s36``: 6-6-18-6; 64-128-320-512; 1e-6; 0.2: 30,862,760, 4.972 G (31M, 5.0G);
- ``poolformerv1_m36``: 6-6-18-6; 96-192-384-768; 1e-6; 0.3: 56,172,520, 8.759 G (56M, 8.8G);
- ``poolformerv1_m48``: 8-8-24-8; 96-192-384-768; 1e-6; 0.4: 73,473,448, 11.533 G (73M, 11.6G).

The parameter counts are exactly those of timm's ``poolformer_*``; the paper's MACs are multiply-adds. The
sail-sg/poolformer README gives the same parameter counts and 77.2 / 80.3 / 81.4 / 82.1 / 82.5 top-1. The drop-path
rates are those of its training recipe, growing linearly from 0 over all blocks.

The initial layer scales are the released code's and timm's: 1e-5 for S12 and S24, 1e-6 for S36, M36 and M48
(whether the paper's text gives one value for all models was not checked; it is an initialisation only, the network
is the same).

The final norm follows timm's ``poolformer_*`` rather than the released code: by default (``head_norm='pooled'``)
the head pools first and then normalises the pooled [B, C] vector over its channels (timm's ``LayerNorm2d``, eps
1e-6, the ``head.norm`` of timm's MetaFormer), so ``forward_features`` returns the last map unnormalised, as timm's.
The released code instead normalises the last map with GroupNorm (one group, over C, H and W) and pools after it;
``head_norm='map'`` builds that (``forward_features`` then returns the normalised map). The two are different
functions of the same parameters: timm's weights (``poolformer_*.sail_in1k``) run timm's form, the released
checkpoints were trained with the map form.

Initialisation as the released code: the MLP's 1×1 convs and the classifier truncated normal (std 0.02) with zero
biases, the norms 1 / 0, the layer scales their initial value; the stem and downsampling convs keep PyTorch's default
initialisation (timm's MetaFormer draws every conv truncated normal, std 0.02).

The module layout is visattn's staged one (``patch_embed``: the stem conv, ``stages.i.downsample``: the conv
opening stage i > 0, ``stages.i.blocks.j`` with ``norm1`` / ``token_mixer`` / ``layer_scale1`` / ``norm2`` /
``mlp.fc1`` / ``mlp.fc2`` / ``layer_scale2``, ``norm``, ``head.norm``, ``head.fc``); `checkpoint_filter_fn` maps
timm's ``poolformer_*`` state dicts (``stem.conv``, ``stages.i.downsample.conv``, ``layer_scale1.scale``) and the
released checkpoints (``patch_embed.proj``, ``network.{0,2,4,6}`` stages, ``network.{1,3,5}.proj`` downsampling,
``layer_scale_1``, ``norm``, ``head``), which then load with ``pretrained_cfg_overlay=dict(file=...)``. The released
weights are at ``https://github.com/sail-sg/poolformer/releases/download/v1.0/poolformer_{s12,...,m48}.pth.tar``.

Any input size works (the padded strided convs round up: a 224² image gives 56², 28², 14², 7² maps);
``features_only=True`` and ``forward_intermediates`` give the four stage outputs as NCHW maps at strides 4, 8, 16
and 32. Dropout names follow timm: ``drop_rate`` before the classifier, ``proj_drop_rate`` in the MLP (the released
``drop_rate``).
"""

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.layers import (
    DropPath,
    GroupNorm1,
    LayerNorm2d,
    LayerScale2d,
    Mlp,
    NormMlpClassifierHead,
    get_device_dtype,
    trunc_normal_,
)
from timm.models import generate_default_cfgs
from torch import Tensor

from .._utils import check_int
from ..layers.poolformer import PoolMixer
from ._builder import build_staged, default_cfg, make_entrypoints
from ._staged import Stage, StagedNet, drop_path_rates

__all__ = ['PoolFormer', 'PoolFormerBlock', 'PoolFormerStage', 'checkpoint_filter_fn']

HEAD_NORMS = ('pooled', 'map')


class PoolFormerBlock(nn.Module):
    """A PoolFormer block on [B, C, H, W]: ``x + DropPath(γ1·PoolMixer(GN(x)))``, then ``x + DropPath(γ2·MLP(GN(x)))``.

    Args:
        dim: channels C.
        pool_size: side of the pooling window (odd).
        mlp_ratio: hidden width of the MLP / C.
        layer_scale: initial value of the layer scales γ1, γ2 (None: no layer scale).
        proj_drop: dropout in the MLP.
        drop_path: stochastic depth of both residual branches.
        act_layer: activation of the MLP.
        norm_layer: norm on NCHW maps before the mixer and the MLP.
        device, dtype: factory arguments.
    """

    def __init__(
            self,
            dim: int,
            pool_size: int = 3,
            mlp_ratio: float = 4.,
            layer_scale: float | None = 1e-5,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: type[nn.Module] = nn.GELU,
            norm_layer: type[nn.Module] = GroupNorm1,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(dim, **dd)
        self.token_mixer = PoolMixer(dim, pool_size=pool_size, **dd)
        self.layer_scale1 = LayerScale2d(dim, layer_scale, **dd) if layer_scale is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, use_conv=True, **dd)
        self.layer_scale2 = LayerScale2d(dim, layer_scale, **dd) if layer_scale is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.layer_scale1(self.token_mixer(self.norm1(x))))
        return x + self.drop_path2(self.layer_scale2(self.mlp(self.norm2(x))))


class PoolFormerStage(Stage):
    """A stage: the 3×3 stride-2 downsampling conv (stages after the first), then its blocks; NCHW in and out."""

    def __init__(
            self,
            in_dim: int,
            dim: int,
            depth: int,
            drop_path: Sequence[float],
            downsample: bool,
            device=None,
            dtype=None,
            **block_kwargs: Any,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.downsample = nn.Conv2d(in_dim, dim, 3, stride=2, padding=1, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            PoolFormerBlock(dim, drop_path=drop_path[j], **dd, **block_kwargs) for j in range(depth)])


class PoolFormer(StagedNet):
    """PoolFormer, timm's model interface.

    Args:
        depths: blocks per stage.
        dims: channels per stage.
        pool_size: side of the pooling window of every block (odd).
        mlp_ratio: hidden width of the MLP / channels.
        layer_scale: initial value of the layer scales (None: no layer scale).
        head_norm: ``'pooled'`` (timm's ``poolformer_*``: pool, then LayerNorm over the pooled channels; default)
            or ``'map'`` (the released code: GroupNorm over the last map, then pool).
        in_chans, num_classes, global_pool: timm's.
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout in the MLP.
        drop_path_rate: stochastic depth, growing linearly over the blocks from 0.
        act_layer: activation of the MLP.
        norm_layer: norm of the blocks (and of the last map with ``head_norm='map'``).
        device, dtype: factory arguments.
    """

    def __init__(
            self,
            depths: Sequence[int] = (2, 2, 6, 2),
            dims: Sequence[int] = (64, 128, 320, 512),
            pool_size: int = 3,
            mlp_ratio: float = 4.,
            layer_scale: float | None = 1e-5,
            head_norm: str = 'pooled',
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.1,
            act_layer: type[nn.Module] = nn.GELU,
            norm_layer: type[nn.Module] = GroupNorm1,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        num_stages = len(depths)
        if len(dims) != num_stages:
            raise ValueError(f'dims must give one width per stage ({num_stages}), got {list(dims)}')
        if head_norm not in HEAD_NORMS:
            raise ValueError(f'head_norm must be one of {HEAD_NORMS}, got {head_norm!r}')
        for d in dims:
            check_int('dims', d)
        self.head_norm = head_norm
        self.patch_embed = nn.Conv2d(in_chans, dims[0], 7, stride=4, padding=2, **dd)
        dpr = drop_path_rates(drop_path_rate, depths)  # the released linear rule
        stages, self.feature_info = [], []
        for i in range(num_stages):
            stages.append(PoolFormerStage(
                dims[max(i - 1, 0)], dims[i], depths[i], dpr[i], downsample=i > 0,
                pool_size=pool_size, mlp_ratio=mlp_ratio, layer_scale=layer_scale, proj_drop=proj_drop_rate,
                act_layer=act_layer, norm_layer=norm_layer, **dd))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        if head_norm == 'map':
            norm, head = norm_layer(dims[-1], **dd), None
        else:
            norm = nn.Identity()
            head = NormMlpClassifierHead(dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                         norm_layer=LayerNorm2d, **dd)
        self._init_head(norm, dims[-1], in_chans, num_classes, global_pool, drop_rate, head=head, **dd)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """The released initialisation: Linear layers and the MLP's 1×1 convs truncated normal (std 0.02) with zero
        biases; the stem and downsampling convs keep PyTorch's default."""
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """None: the released model declares none (timm's optimiser factory already exempts the 1-D parameters,
        norms, biases and layer scales)."""
        return set()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        dd = get_device_dtype(self)
        if isinstance(self.head, NormMlpClassifierHead):
            # the head's norm is sized for the last stage: it goes when pruning leaves an earlier stage last
            resized = self.num_features != self.head.in_features
            self.head.reset(num_classes, pool_type=global_pool, reset_other=resized, in_features=self.num_features,
                            **dd)
        else:
            self.head.reset(num_classes, pool_type=global_pool, in_features=self.num_features, **dd)
        self.head_hidden_size = self.head.num_features
        if global_pool is not None:
            self.global_pool = global_pool

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """`FeatureIntermediates`'s; a pruned head also loses its norm (as timm's MetaFormer's ``reset_other``)."""
        take_indices = super().prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        if prune_head and isinstance(self.head, NormMlpClassifierHead):
            self.head.reset(0, reset_other=True)
        return take_indices


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: PoolFormer) -> dict[str, Tensor]:
    """Map a timm ``poolformer_*`` state dict or a released PoolFormer checkpoint to this layout.

    timm's: ``stem.conv.*`` -> ``patch_embed.*``, ``stages.i.downsample.conv.*`` -> ``stages.i.downsample.*``,
    ``layer_scale{1,2}.scale`` -> ``layer_scale{1,2}.gamma``. Released: ``patch_embed.proj.*`` -> ``patch_embed.*``,
    ``network.{2i}.j.*`` -> ``stages.i.blocks.j.*``, ``network.{2i+1}.proj.*`` (closing stage i) ->
    ``stages.{i+1}.downsample.*``, ``layer_scale_{1,2}`` -> ``layer_scale{1,2}.gamma``, ``head.*`` -> ``head.fc.*``.
    The final norm (timm's ``head.norm``, the released ``norm``) goes where the model's ``head_norm`` puts it
    (``head.norm`` for ``'pooled'``, ``norm`` for ``'map'``). A ``{'model': ...}`` or ``{'state_dict': ...}``
    wrapper is unpacked; a state dict in this layout passes as is."""
    state_dict = state_dict.get('model', state_dict)
    state_dict = state_dict.get('state_dict', state_dict)
    if 'patch_embed.weight' in state_dict:
        return state_dict
    final = 'norm.' if model.head_norm == 'map' else 'head.norm.'
    out = {}
    for key, value in state_dict.items():
        if key.startswith(('stem.conv.', 'patch_embed.proj.')):
            key = 'patch_embed.' + key.split('.', 2)[2]
        elif m := re.match(r'network\.(\d+)\.(.*)', key):
            index, rest = int(m.group(1)), m.group(2)
            if index % 2:
                key = f'stages.{index // 2 + 1}.downsample.' + rest.removeprefix('proj.')
            else:
                key = f'stages.{index // 2}.blocks.{rest}'
        elif key.startswith(('head.norm.', 'norm.')):
            key = final + key.rsplit('.', 1)[1]
        elif key.startswith('head.') and not key.startswith('head.fc.'):
            key = 'head.fc.' + key[len('head.'):]
        key = key.replace('.downsample.conv.', '.downsample.')
        key = re.sub(r'layer_scale_?([12])(\.scale)?$', r'layer_scale\1.gamma', key)
        out[key] = value
    return out


_PAPER = '2111.11418'
_S = dict(dims=(64, 128, 320, 512))
_M = dict(dims=(96, 192, 384, 768))
_MODELS: dict[str, dict[str, Any]] = {
    'poolformerv1_s12': dict(depths=(2, 2, 6, 2), layer_scale=1e-5, drop_path_rate=0.1, **_S),
    'poolformerv1_s24': dict(depths=(4, 4, 12, 4), layer_scale=1e-5, drop_path_rate=0.1, **_S),
    'poolformerv1_s36': dict(depths=(6, 6, 18, 6), layer_scale=1e-6, drop_path_rate=0.2, **_S),
    'poolformerv1_m36': dict(depths=(6, 6, 18, 6), layer_scale=1e-6, drop_path_rate=0.3, **_M),
    'poolformerv1_m48': dict(depths=(8, 8, 24, 8), layer_scale=1e-6, drop_path_rate=0.4, **_M),
}

default_cfgs = generate_default_cfgs({
    name: default_cfg(_PAPER, interpolation='bicubic', crop_pct=0.9 if '_s' in name else 0.95,
                      first_conv='patch_embed', classifier='head.fc')
    for name in _MODELS
})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> PoolFormer:
    return build_staged(PoolFormer, variant, pretrained, _MODELS[variant], checkpoint_filter_fn, **kwargs)


make_entrypoints(__name__, _create, dict.fromkeys(_MODELS, _PAPER))
