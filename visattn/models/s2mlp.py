"""S²-MLP (isotropic) and S²-MLPv2 (two-level pyramid) backbones, registered with timm.

Papers: "S²-MLP: Spatial-Shift MLP Architecture for Vision", Yu, Li, Cai, Sun, Li, WACV 2022, arXiv:2106.07477;
"S²-MLPv2: Improved Spatial-Shift MLP Architecture for Vision", Yu, Li, Cai, Sun, Li, 2021, arXiv:2108.01072.
No code was released (the papers' implementation is in PaddlePaddle); the configurations are the papers' tables.

S²-MLP (Sec. 3.4-3.5, Table 2, Fig. 1): a 16×16 patch-wise fully-connected layer followed by a layer norm
(``e = LN(W0·p + b0)``), N blocks ``x + FC2(S1(GELU(FC1(LN(x)))))`` then ``x + FC4(GELU(FC3(LN(x))))`` (expansion
r = 4), global average pooling and a linear classifier (the paper names no norm after the last block: none here);
wide: c = 768, N = 12; deep: c = 384, N = 36, with ResMLP's affine transform ``α ⊙ x + β`` in place of every layer
norm (Sec. 4.1, "for a fair comparison" with ResMLP-36).

S²-MLPv2 (Sec. 4, Table 1): Vision Permutator's two-level pyramid, a 7×7 stride-7 patch embedding (32×32 tokens at
224²), the first level's blocks, a 2×2 stride-2 conv to the second level (16×16 tokens), its blocks, a final layer
norm (ViP's), global average pooling and a linear classifier; blocks ``y = x + S²-MLPv2(LN(x))``, ``z = y +
MLP(LN(y))`` (eq. 5), expansion ratio 3; Small/7: c = 192 × 4 blocks, then 384 × 14; Medium/7: 256 × 7, then
512 × 17; drop path 0.1 (Sec. 5).

=================  ==========  ===========================================================================
variant            parameters  paper (top-1, FLOPs)
=================  ==========  ===========================================================================
``s2mlp_wide``     72,241,384  71M without the classifier (80.0, 14.0B); ours without it: 71,472,384
``s2mlp_deep``     53,917,288  51M without the classifier (80.7, 10.5B); ours without it: 53,532,288 (*)
``s2mlpv2_small``  25,113,448  25M (82.0, 6.9B)
``s2mlpv2_medium`` 55,269,864  55M (83.6, 16.3B)
=================  ==========  ===========================================================================

(*) S²-MLP's Table 2 counts parameters "excluding the weights of the fully-connected layer for classification", by
its own formula ``(3p² + 1)c + N·(c²(2r + 2) + c(3 + r))`` (fully-connected layers only): 71,433,984 for wide (71M,
as printed) and 53,476,224 for deep, which the paper prints as 51M; the FLOPs the same formula gives (10.46B) match
its 10.5B, so the configuration is taken as printed and the 51M as a misprint. Ours adds the norms' 2c each.

The S²-MLPv2 split attention's hidden width c̄ (``W1 ∈ R^{c×c̄}``, eq. 3) is not given in the paper; its counts
(25M / 55M, the same as ViP's) need c̄ = c/4, ViP's split attention width, which is used here (``attn_ratio=0.25``;
``attn_ratio=1`` gives `SpatialShiftMlp`'s default c̄ = c, 31.8M / 70.3M). The split attention has no biases
(eq. 3), sums over the positions (eq. 2; ViP averages) and runs in at least float32.

The token mixers are visattn's `SpatialShiftMlp` (``version=1`` / ``version=2``, NCHW); the whole network is NCHW
(norms over channels are timm's ``LayerNorm2d``, eps 1e-6, the channel MLPs 1×1 convs). Any input size works: S²-MLP
has no size-dependent weights; the patch embeddings floor like a strided conv (multiples of 16, resp. 14, are
covered exactly; at 64×64 S²-MLPv2's maps are 9×9 and 4×4). ``forward_features`` returns the (normalised, for v2)
last map [B, C, H/s, W/s]; ``features_only=True`` and ``forward_intermediates`` give NCHW maps: S²-MLP the stride-16
map after any block (``feature_info`` lists every block; by default the last block of each quarter), S²-MLPv2 the map
after any block of either level (``feature_info`` lists every block, numbered over both levels, at strides 7 and 14;
by default the first level's last block and the last block of each third of the second level: Small (3, 8, 13, 17),
Medium (6, 12, 18, 23)). No weights are published. Dropout names follow timm: ``drop_rate`` before the
classifier, ``proj_drop_rate`` in the channel MLPs; the papers give no drop-path rate for S²-MLP (default 0 here).
"""

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.layers import ConvMlp, DropPath, LayerNorm2d, PatchEmbed, trunc_normal_
from timm.models import generate_default_cfgs
from torch import Tensor

from ..layers.s2mlp import SpatialShiftMlp
from ._builder import build_checked, default_cfg, make_entrypoint, paper_id
from ._staged import ClassifierNet, Stage, StagedNet, drop_path_rates
from .gfnet import _quarter_ends

__all__ = ['Affine2d', 'S2MLP', 'S2MLPBlock', 'S2MLPv2', 'S2MLPv2Stage', 'SpatialShiftMlpV2']


class Affine2d(nn.Module):
    """ResMLP's affine transform over the channels of [B, C, H, W]: ``α ⊙ x + β`` (α = 1, β = 0 at init)."""

    def __init__(self, channels: int, device=None, dtype=None) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels, device=device, dtype=dtype))
        self.beta = nn.Parameter(torch.zeros(channels, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.beta[:, None, None], self.alpha[:, None, None], x)


_NORMS: dict[str, type[nn.Module]] = {'ln': LayerNorm2d, 'affine': Affine2d}


def _norm_layer(norm_layer: str | type[nn.Module]) -> type[nn.Module]:
    if isinstance(norm_layer, str):
        if norm_layer not in _NORMS:
            raise ValueError(f"norm_layer must be one of {sorted(_NORMS)} or a class, got {norm_layer!r}")
        return _NORMS[norm_layer]
    return norm_layer


class SpatialShiftMlpV2(SpatialShiftMlp):
    """`SpatialShiftMlp` ``version=2`` with the split attention's hidden width c̄ = ``attn_ratio``·C (no biases):
    ``W1`` C × c̄, ``W2`` c̄ × 3C (the paper's eq. 3; its parameter counts need ViP's c̄ = C/4)."""

    def __init__(self, channels: int, attn_ratio: float = 0.25, device=None, dtype=None) -> None:
        super().__init__(channels, version=2, device=device, dtype=dtype)
        if not attn_ratio > 0:
            raise ValueError(f'attn_ratio must be > 0, got {attn_ratio}')
        hidden = max(1, int(channels * attn_ratio))
        self.attn_fc1 = nn.Linear(channels, hidden, bias=False, device=device, dtype=dtype)
        self.attn_fc2 = nn.Linear(hidden, 3 * channels, bias=False, device=device, dtype=dtype)


class S2MLPBlock(nn.Module):
    """An S²-MLP / S²-MLPv2 block on [B, C, H, W]: ``x + DropPath(S²(N(x)))``, then ``x + DropPath(MLP(N(x)))``.

    Args:
        dim: channels C.
        mlp_ratio: channel MLP hidden width / C (the papers' expansion ratio).
        version: 1 (S²-MLP's FC-GELU-shift-FC) or 2 (S²-MLPv2's three branches and split attention).
        attn_ratio: version 2's split attention hidden width / C.
        norm_layer: norm over channels on NCHW maps.
        proj_drop: dropout in the channel MLP.
        drop_path: stochastic depth of both branches.
        device, dtype: factory arguments.
    """

    def __init__(
            self,
            dim: int,
            mlp_ratio: float = 4.,
            version: int = 1,
            attn_ratio: float = 0.25,
            norm_layer: type[nn.Module] = LayerNorm2d,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(dim, **dd)
        if version == 1:
            self.mixer = SpatialShiftMlp(dim, version=1, **dd)
        else:
            self.mixer = SpatialShiftMlpV2(dim, attn_ratio=attn_ratio, **dd)
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.mixer(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _init_weights(m: nn.Module) -> None:
    """Linear and 1×1-conv weights trunc-normal (std 0.02) with zero bias (the DeiT/ViP recipe the papers train
    with); the patch embeddings keep PyTorch's conv init."""
    if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class S2MLP(ClassifierNet):
    """The isotropic S²-MLP (wide / deep), timm's model interface.

    ``forward_intermediates`` / ``prune_intermediate_layers`` (`FeatureIntermediates`): the taps are the maps after
    every block (stride ``patch_size``), NCHW; ``norm`` (none in S²-MLP: the identity) applies to each.

    Args:
        patch_size: side of the patches (the stride).
        in_chans, num_classes, global_pool: timm's.
        embed_dim: channels c.
        depth: number of blocks N.
        mlp_ratio: expansion ratio r.
        norm_layer: ``'ln'`` (LayerNorm over channels), ``'affine'`` (ResMLP's affine transform) or a class on
            NCHW maps; used after the patch embedding and in every block.
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout in the channel MLPs.
        drop_path_rate: stochastic depth, growing linearly over the blocks from 0.
        device, dtype: factory arguments.
    """

    _fi_isotropic = True

    def __init__(
            self,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 768,
            depth: int = 12,
            mlp_ratio: float = 4.,
            norm_layer: str | type[nn.Module] = 'ln',
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if depth < 1:
            raise ValueError(f'depth must be >= 1, got {depth}')
        norm = _norm_layer(norm_layer)
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size=None, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                                      norm_layer=norm, flatten=False, output_fmt='NCHW', strict_img_size=False, **dd)
        dpr = drop_path_rates(drop_path_rate, [depth])[0]
        self.blocks = nn.Sequential(*[
            S2MLPBlock(embed_dim, mlp_ratio, version=1, norm_layer=norm, proj_drop=proj_drop_rate, drop_path=dpr[i],
                       **dd)
            for i in range(depth)])
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f'blocks.{i}') for i in range(depth)]
        # no norm after the last block: the paper pools its output directly
        self._init_head(nn.Identity(), embed_dim, in_chans, num_classes, global_pool, drop_rate, **dd)
        self.grad_checkpointing = False
        self.apply(_init_weights)


class S2MLPv2Stage(Stage):
    """A level of S²-MLPv2: the 2×2 stride-2 conv (levels after the first), then its blocks; NCHW in and out."""

    def __init__(self, dim_in: int, dim: int, depth: int, drop_path: Sequence[float], downsample: bool,
                 device=None, dtype=None, **block_kwargs: Any) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.downsample = nn.Conv2d(dim_in, dim, 2, stride=2, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            S2MLPBlock(dim, version=2, drop_path=drop_path[i], **dd, **block_kwargs) for i in range(depth)])


class S2MLPv2(StagedNet):
    """S²-MLPv2 on ViP's pyramid, timm's model interface.

    ``forward_intermediates`` / ``prune_intermediate_layers`` (`FeatureIntermediates`): the taps are the maps after
    every block, numbered over both levels (strides 7, then 14), NCHW; ``norm`` applies to the last level's taps
    only; pruning into the first level drops the norm (sized for the last level) and the head.

    Args:
        patch_size: side of the first level's patches (7).
        in_chans, num_classes, global_pool: timm's.
        embed_dims: channels per level.
        depths: blocks per level.
        mlp_ratio: expansion ratio of the channel MLPs.
        attn_ratio: split attention hidden width / channels (0.25; see the module docstring).
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout in the channel MLPs.
        drop_path_rate: stochastic depth, growing linearly over all blocks from 0.
        device, dtype: factory arguments.
    """

    _fi_block_taps = True

    def __init__(
            self,
            patch_size: int = 7,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Sequence[int] = (192, 384),
            depths: Sequence[int] = (4, 14),
            mlp_ratio: float = 3.,
            attn_ratio: float = 0.25,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.1,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if not depths or len(embed_dims) != len(depths) or any(int(d) < 1 for d in depths):
            raise ValueError(f'embed_dims and depths must give one value per level (depths >= 1), got '
                             f'{list(embed_dims)} and {list(depths)}')
        self.patch_embed = PatchEmbed(img_size=None, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dims[0], flatten=False, output_fmt='NCHW',
                                      strict_img_size=False, **dd)
        dpr = drop_path_rates(drop_path_rate, depths)
        stages, self.feature_info = [], []
        for i, depth in enumerate(depths):
            stages.append(S2MLPv2Stage(
                embed_dims[max(i - 1, 0)], embed_dims[i], depth, dpr[i], downsample=i > 0, mlp_ratio=mlp_ratio,
                attn_ratio=attn_ratio, proj_drop=proj_drop_rate, **dd))
            self.feature_info += [dict(num_chs=embed_dims[i], reduction=patch_size * 2 ** i,
                                       module=f'stages.{i}.blocks.{j}') for j in range(depth)]
        self.stages = nn.Sequential(*stages)
        self._init_head(LayerNorm2d(embed_dims[-1], **dd), embed_dims[-1], in_chans, num_classes, global_pool,
                        drop_rate, **dd)
        self.apply(_init_weights)


_S2MLP: dict[str, dict[str, Any]] = {
    's2mlp_wide': dict(embed_dim=768, depth=12, mlp_ratio=4., norm_layer='ln'),
    's2mlp_deep': dict(embed_dim=384, depth=36, mlp_ratio=4., norm_layer='affine'),
}
_S2MLPV2: dict[str, dict[str, Any]] = {
    's2mlpv2_small': dict(embed_dims=(192, 384), depths=(4, 14), mlp_ratio=3., drop_path_rate=0.1),
    's2mlpv2_medium': dict(embed_dims=(256, 512), depths=(7, 17), mlp_ratio=3., drop_path_rate=0.1),
}

default_cfgs = generate_default_cfgs({
    **{name: default_cfg('2106.07477', pool_size=(14, 14), crop_pct=0.875, interpolation='bicubic',
                         first_conv='patch_embed.proj', classifier='head.fc') for name in _S2MLP},
    **{name: default_cfg('2108.01072', pool_size=(16, 16), crop_pct=0.875, interpolation='bicubic',
                         first_conv='patch_embed.proj', classifier='head.fc') for name in _S2MLPV2},
})


def _level_ends(depths: Sequence[int]) -> tuple[int, ...]:
    """S²-MLPv2's default ``features_only`` taps, numbered over all blocks: the last block of every level but the
    last, then the last block of each third of the last level (Small (4, 14): (3, 8, 13, 17))."""
    first = sum(depths[:-1])
    ends = [sum(depths[:i + 1]) - 1 for i in range(len(depths) - 1)]
    return tuple(sorted({*ends, *(first + max(0, math.ceil(depths[-1] * q / 3) - 1) for q in range(1, 4))}))


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> S2MLP | S2MLPv2:
    if variant in _S2MLP:
        args = dict(_S2MLP[variant], **kwargs)
        cls, out_indices = S2MLP, args.pop('out_indices', _quarter_ends(args['depth']))
    else:
        args = dict(_S2MLPV2[variant], **kwargs)
        cls, out_indices = S2MLPv2, args.pop('out_indices', _level_ends(args['depths']))
    return build_checked(cls, variant, pretrained, feature_cfg=dict(feature_cls='getter', out_indices=out_indices),
                         **args)


for _name in _S2MLP:
    make_entrypoint(_name, __name__, _create, f'{_name} (arXiv:2106.07477); see the docstring of {__name__}.')
for _name in _S2MLPV2:
    make_entrypoint(_name, __name__, _create, f'{_name} ({paper_id("2108.01072")}); see the docstring of {__name__}.')
