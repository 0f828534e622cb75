"""ShiftViT: a Swin-like hierarchy whose attention layers are replaced by a zero-parameter shift, registered with timm.

Paper: "When Shift Operation Meets Vision Transformer: An Extremely Simple Alternative to Attention Mechanism",
Wang, Zhao, Tang, Luo, Zeng, AAAI 2022, arXiv:2201.10801. Configurations from the released code
(microsoft/SPACH, ``models/shiftvit.py`` and ``models/registry.py``):

- a 4×4 stride-4 patch embedding (conv with bias) followed by a norm; four stages with channels C, 2C, 4C, 8C; a
  patch merging between stages (a norm, then a 2×2 stride-2 conv without bias doubling the channels); a final
  norm, global average pooling and a linear classifier;
- every block is ``x = shift(x)`` (no residual around it: `ShiftMixer`, ``⌊C / n_div⌋`` channels moved one pixel
  in each of the four directions, zero filled), then ``x + MLP(norm(x))`` with a GELU MLP of 1×1 convs;
- the norm is the released default ``GN1``: GroupNorm with one group, which normalises each sample over C, H and
  W together (the released code's stand-in for LayerNorm on NCHW maps; timm's `GroupNorm1`, the same math);
  ``norm_layer='bn'`` gives the released ``'BN'`` option (BatchNorm2d). The released registry functions use GN1.

====================  =============  ===========  ===  =====  ============  ==========  =========
variant               released name  depths       C    ratio  n_div / drop  parameters  paper
====================  =============  ===========  ===  =====  ============  ==========  =========
``shiftvit_t_light``  light_tiny     2-2-6-2      96   4      12 / 0.2      19,608,328  20M, 3.0G
``shiftvit_t``        r2_tiny        6-8-18-6     96   2      12 / 0.2      28,566,664  29M, 4.5G
``shiftvit_s_light``  light_small    2-2-18-2     96   4      12 / 0.4      33,796,360  34M, 5.7G
``shiftvit_s``        r2_small       10-18-36-10  96   2      12 / 0.4      50,304,136  50M, 8.8G
``shiftvit_b_light``  light_base     2-2-18-2     128  4      16 / 0.5      59,708,776  (60M)
``shiftvit_b``        r2_base        10-18-36-10  128  2      16 / 0.6      89,026,408  (89M)
====================  =============  ===========  ===  =====  ============  ==========  =========

(depths, channels C of the first stage, MLP ratio, ``n_div`` and drop-path rate from the released registry; the
T and S counts are those of the paper and of the released README's table, 79.4 / 81.7 / 81.6 / 82.8 top-1 on
ImageNet-1k at 224². The B models are in the released registry but not in its README table; the bracketed 60M
and 89M are the paper's B rows as we read them, not confirmed against a released table.)

Known differences from the released code: the module layout is timm's (``stages.i.downsample`` opens stage i,
``head.fc`` is the classifier); `checkpoint_filter_fn` maps the released checkpoints (``layers.i.blocks`` /
``layers.i.downsample`` closing level i, ``head``), which then load with ``pretrained_cfg_overlay=dict(file=...)``.
The released weights are at ``https://github.com/microsoft/SPACH/releases/download/v1.0/`` as
``shiftvit_{tiny,small}_{light,r2}.pth``. The released dropout after the patch embedding is left out (0 in every
released model); dropout names follow timm: ``drop_rate`` before the classifier, ``proj_drop_rate`` in the MLP
(the released ``drop_rate``). Any input whose sides are multiples of 32 works (other sizes are floored by the
strided convs, as in the released code); ``forward_features`` returns the normalised last map
[B, 8C, H/32, W/32] (NCHW, the released layout); ``features_only=True`` and ``forward_intermediates`` give NCHW maps
at strides 4, 8, 16 and 32.
"""

from collections.abc import Sequence
from typing import Any

import torch.nn as nn
from timm.layers import (
    DropPath,
    GroupNorm1,
    Mlp,
    PatchEmbed,
    get_act_layer,
    to_2tuple,
    trunc_normal_,
)
from timm.models import generate_default_cfgs
from torch import Tensor

from ..layers.shift import ShiftMixer
from ._builder import build_staged, default_cfg, make_entrypoints
from ._staged import Stage, StagedNet, drop_path_rates, rename_level_keys

__all__ = ['ShiftViT', 'ShiftViTBlock', 'ShiftViTStage', 'checkpoint_filter_fn', 'resolve_norm_layer']

_NORMS: dict[str, type[nn.Module]] = {'gn1': GroupNorm1, 'bn': nn.BatchNorm2d}


def resolve_norm_layer(norm_layer: str | type[nn.Module]) -> type[nn.Module]:
    """The released code's norm names (``'gn1'``: GroupNorm with one group, ``'bn'``: BatchNorm2d, any case) or a
    norm class taking ``(channels, device=, dtype=)`` on NCHW maps."""
    if isinstance(norm_layer, str):
        if norm_layer.lower() not in _NORMS:
            raise ValueError(f"norm_layer must be one of {sorted(_NORMS)} or a norm class, got {norm_layer!r}")
        return _NORMS[norm_layer.lower()]
    if not (isinstance(norm_layer, type) and issubclass(norm_layer, nn.Module)) and not callable(norm_layer):
        raise TypeError(f'norm_layer must be a name or an nn.Module class, got {type(norm_layer).__name__}')
    return norm_layer


class PatchMerging(nn.Module):
    """ShiftViT's patch merging: a norm, then a 2×2 stride-2 conv without bias doubling the channels; NCHW."""

    def __init__(self, dim: int, norm_layer: type[nn.Module] = GroupNorm1, device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm = norm_layer(dim, **dd)
        self.reduction = nn.Conv2d(dim, 2 * dim, 2, stride=2, bias=False, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.reduction(self.norm(x))


class ShiftViTBlock(nn.Module):
    """A shift block on [B, C, H, W]: ``x = shift(x)`` (no residual), then ``x + MLP(norm(x))``.

    Args:
        dim: channels C.
        n_div: ``⌊C / n_div⌋`` channels are shifted in each of the four directions (default 12).
        mlp_ratio: MLP hidden width / channels.
        proj_drop: dropout in the MLP.
        drop_path: stochastic depth of the MLP branch.
        act_layer, norm_layer: of the MLP and the norm before it (``norm2``, as the released block).
        device, dtype: factory arguments.
    """

    def __init__(
            self,
            dim: int,
            n_div: int = 12,
            mlp_ratio: float = 4.,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: type[nn.Module] = nn.GELU,
            norm_layer: type[nn.Module] = GroupNorm1,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.shift = ShiftMixer(dim, shift_div=1 / n_div, **dd)
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, use_conv=True, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.shift(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ShiftViTStage(Stage):
    """A stage: the patch merging (stages after the first), then its shift blocks; [B, C, H, W] in and out."""

    def __init__(
            self,
            dim: int,
            depth: int,
            drop_path: Sequence[float],
            downsample: bool,
            norm_layer: type[nn.Module] = GroupNorm1,
            device=None,
            dtype=None,
            **block_kwargs: Any,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.downsample = PatchMerging(dim // 2, norm_layer, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            ShiftViTBlock(dim, drop_path=drop_path[i], norm_layer=norm_layer, **dd, **block_kwargs)
            for i in range(depth)])


class ShiftViT(StagedNet):
    """ShiftViT, timm's model interface.

    Args:
        depths: blocks per stage.
        embed_dim: channels of the first stage (doubled at every stage).
        mlp_ratio: MLP hidden width / channels.
        n_div: ``⌊C / n_div⌋`` channels shifted per direction in every block (the released 12, or 16 for the B
            models).
        img_size: accepted for timm (any input size works).
        patch_size: of the patch embedding (default 4).
        in_chans, num_classes, global_pool: timm's.
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout in the MLPs (the released ``drop_rate``).
        drop_path_rate: stochastic depth, growing linearly over the blocks from 0.
        norm_layer: ``'gn1'`` (the released default), ``'bn'``, or a norm class on NCHW maps.
        act_layer: the MLP's activation: a class or a timm name (default GELU; the released ``'RELU'`` option is
            ``'relu'``).
        patch_norm: a norm after the patch embedding (the released default True).
        device, dtype: factory arguments.
    """

    def __init__(
            self,
            depths: Sequence[int] = (2, 2, 6, 2),
            embed_dim: int = 96,
            mlp_ratio: float = 4.,
            n_div: int = 12,
            img_size: int | tuple[int, int] = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.1,
            norm_layer: str | type[nn.Module] = 'gn1',
            act_layer: str | type[nn.Module] = nn.GELU,
            patch_norm: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if not depths or any(int(d) < 1 for d in depths):
            raise ValueError(f'depths must be a non-empty sequence of positive ints, got {depths!r}')
        if not 4 <= n_div or int(n_div) != n_div:
            raise ValueError(f'n_div must be an int >= 4 (4 / n_div of the channels are shifted), got {n_div!r}')
        if embed_dim // n_div < 1:
            raise ValueError(f'embed_dim // n_div must be at least 1, got embed_dim = {embed_dim}, n_div = {n_div}')
        norm_layer = resolve_norm_layer(norm_layer)
        act_layer = get_act_layer(act_layer) if isinstance(act_layer, str) else act_layer
        num_stages = len(depths)
        self.img_size = to_2tuple(img_size)
        dims = [int(embed_dim * 2 ** i) for i in range(num_stages)]
        self.patch_embed = PatchEmbed(
            img_size=None, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            norm_layer=norm_layer if patch_norm else None, flatten=False, output_fmt='NCHW', strict_img_size=False,
            **dd)
        dpr = drop_path_rates(drop_path_rate, depths)  # the released linspace(0, rate, n)
        stages, self.feature_info = [], []
        for i in range(num_stages):
            stages.append(ShiftViTStage(
                dims[i], depths[i], dpr[i], downsample=i > 0, norm_layer=norm_layer,
                n_div=int(n_div), mlp_ratio=mlp_ratio, proj_drop=proj_drop_rate, act_layer=act_layer, **dd))
            self.feature_info.append(dict(num_chs=dims[i], reduction=patch_size * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self._init_head(norm_layer(dims[-1], **dd), dims[-1], in_chans, num_classes, global_pool, drop_rate, **dd)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """The released init: Linear and conv weights trunc-normal (std 0.02) with zero bias; norms 1 / 0."""
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: ShiftViT) -> dict[str, Tensor]:
    """Map a released ShiftViT checkpoint to this layout: ``layers.i.blocks.*`` -> ``stages.i.blocks.*``,
    ``layers.i.downsample.*`` (closing level i) -> ``stages.{i+1}.downsample.*``, ``head.*`` -> ``head.fc.*``
    (`rename_level_keys`, as NAT's). A ``{'model': ...}`` or ``{'state_dict': ...}`` wrapper is unpacked; a state
    dict in this layout passes as is."""
    return rename_level_keys(state_dict, 'layers')


_MODELS: dict[str, dict[str, Any]] = {
    'shiftvit_t_light': dict(embed_dim=96, depths=(2, 2, 6, 2), mlp_ratio=4., drop_path_rate=0.2, n_div=12),
    'shiftvit_t': dict(embed_dim=96, depths=(6, 8, 18, 6), mlp_ratio=2., drop_path_rate=0.2, n_div=12),
    'shiftvit_s_light': dict(embed_dim=96, depths=(2, 2, 18, 2), mlp_ratio=4., drop_path_rate=0.4, n_div=12),
    'shiftvit_s': dict(embed_dim=96, depths=(10, 18, 36, 10), mlp_ratio=2., drop_path_rate=0.4, n_div=12),
    'shiftvit_b_light': dict(embed_dim=128, depths=(2, 2, 18, 2), mlp_ratio=4., drop_path_rate=0.5, n_div=16),
    'shiftvit_b': dict(embed_dim=128, depths=(10, 18, 36, 10), mlp_ratio=2., drop_path_rate=0.6, n_div=16),
}
_ARXIV = '2201.10801'

default_cfgs = generate_default_cfgs({
    name: default_cfg(_ARXIV, interpolation='bicubic', first_conv='patch_embed.proj', classifier='head.fc',
                      license='mit')
    for name in _MODELS
})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> ShiftViT:
    return build_staged(ShiftViT, variant, pretrained, _MODELS[variant], checkpoint_filter_fn, **kwargs)


make_entrypoints(__name__, _create, dict.fromkeys(_MODELS, _ARXIV))
