"""Swin Transformer (Swin-T / Swin-S / Swin-B) and Swin Transformer V2 (SwinV2-T), registered with timm.

Papers: "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", Liu, Lin, Cao, Hu, Wei, Zhang,
Lin, Guo, ICCV 2021, arXiv:2103.14030 (https://arxiv.org/abs/2103.14030); "Swin Transformer V2: Scaling Up Capacity
and Resolution", Liu, Hu, Lin, Yao, Xie, Wei, Ning, Cao, Zhang, Dong, Wei, Guo, CVPR 2022, arXiv:2111.09883
(https://arxiv.org/abs/2111.09883).

The blocks, on the tokens ``z`` of a [B, H, W, C] map (eq. 3 of Swin: pre-norm; section 3.1 of Swin V2:
res-post-norm):

    Swin:     ẑ = z + DropPath(W-MSA(LN(z))),   z' = ẑ + DropPath(MLP(LN(ẑ)))
    Swin V2:  ẑ = z + DropPath(LN(W-MSA(z))),   z' = ẑ + DropPath(LN(MLP(ẑ)))

W-MSA is `WindowAttn` (``softmax(QKᵀ/√d + B)V`` with Swin's relative position table) in Swin and `WindowAttnV2`
(``cos(q, k)/τ + B``, B from the log-spaced continuous position bias MLP) in Swin V2; the MLP is Linear(C, 4C) ->
GELU -> Linear(4C, C). The network, from Swin's Table 1 / section 3.3 and the released implementation
(microsoft/Swin-Transformer, ``models/swin_transformer{,_v2}.py``, ``configs/swin*/``), as timm's
``swin_{tiny,small,base}_patch4_window7_224`` and ``swinv2_tiny_window8_256``:

- patch embedding: a 4×4 stride-4 conv to C channels, then LayerNorm (stride 4);
- four stages of blocks alternating regular windows (shift 0) and shifted windows (shift ``M // 2``: 3 for M = 7,
  4 for M = 8);
- patch merging between stages: the 2×2 neighbourhood of every output pixel concatenated along channels in the
  order ``x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]`` (rows, columns; Swin's and timm's), then
  LayerNorm(4C) -> Linear(4C, 2C, no bias) in Swin; Linear(4C, 2C, no bias) -> LayerNorm(2C) in Swin V2;
- final LayerNorm, global average pooling, linear classifier.

Sizes: Swin-T C = 96, depths [2, 2, 6, 2], heads [3, 6, 12, 24], drop path 0.2: 28,288,354 parameters (the paper's
28M, 4.5G FLOPs); Swin-S depths [2, 2, 18, 2], drop path 0.3: 49,606,258 (50M, 8.7G); Swin-B C = 128, heads
[4, 8, 16, 32], depths [2, 2, 18, 2], drop path 0.5: 87,768,224 (88M, 15.4G); window M = 7 at 224². SwinV2-T:
Swin-T's sizes with window M = 8 at 256² (the released ``swinv2_tiny_patch4_window8_256``), drop path 0.2:
28,347,154 parameters (the released model table: 28M, 5.9G). The counts are exactly timm's for its models of these
sizes (`checkpoint_filter_fn` loads their state dicts); the papers' "FLOPs" are multiply-adds. Stochastic depth grows
linearly from 0 over all blocks (the released ``linspace(0, rate, sum(depths))``).

Initialisation as the released models: Linear weights truncated normal (std 0.02) with zero biases, LayerNorms 1 / 0,
the relative position tables truncated normal (std 0.02), the patch embedding conv PyTorch's default; Swin V2 also
zeroes the weights and biases of the two post-norms of every block (the released ``_init_respostnorm``), so that every
block starts as the identity.

Swin V2's patch merging normalises after its reduction as its released code does (the paper does not describe the
merging layer); the paper's extra LayerNorm on the main branch every 6 blocks is for its largest models only and is
left out, as in the released SwinV2-T.

What differs from the released classification code (which timm's Swin follows): any input size runs. The image is
zero-padded at the bottom/right to a multiple of 4 (as the released detection/segmentation backbone), the patch
merging zero-pads an odd side (as timm and the released detection code), and the window attention pads each map to a
multiple of the window (`WindowAttn`): with ``pad_mode='mask'`` (default) the padded tokens are masked out of the keys,
so every output is attention over its window's pixels of the map as the equations above say; ``pad_mode='zeros'`` lets
them take part as zero tokens, as the released detection code. A map side not larger than the window shrinks the
window to it and drops the shift along it (the released rule; per side as timm). The released classification code
needs the training size; at sizes that are multiples of the window in every stage (224² for M = 7, 256² for M = 8)
both modes compute the released model.

The shifted windows' mask is -inf (exactly zero weight) where the released code adds -100 (a weight of e^-100 of the
row's largest: the same result in float64 to rounding).

``forward_features`` returns the normalised last map [B, H/32, W/32, C] (``output_fmt = 'NHWC'``, as timm's Swin);
``features_only=True`` and ``forward_intermediates`` give NCHW maps at strides 4, 8, 16 and 32 (``output_fmt``
``'NCHW'`` or ``'NHWC'``).

The module layout is timm's with ``stages`` for its ``layers`` (``patch_embed``, ``stages.i.downsample`` opening stage
i > 0, ``stages.i.blocks.j`` with ``norm1`` / ``attn`` / ``norm2`` / ``mlp``, ``norm``, ``head.fc``) and the attention
parameters are those of timm's ``WindowAttention`` (V1 and V2); `checkpoint_filter_fn` maps timm's state dicts and the
released checkpoints (``layers.i.downsample`` closing stage i, ``head``), which then load with
``pretrained_cfg_overlay=dict(file=...)``. The released weights are linked from MODELHUB.md of
microsoft/Swin-Transformer (``swin_tiny_patch4_window7_224.pth``, ..., ``swinv2_tiny_patch4_window8_256.pth``).

Dropout names follow timm: ``drop_rate`` before the classifier, ``proj_drop_rate`` after the attention and in the MLP,
``attn_drop_rate`` on the attention weights.
"""

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, resize_rel_pos_bias_table, to_2tuple
from timm.models import generate_default_cfgs
from torch import Tensor

from .._utils import check_int
from ..layers.window import WindowAttn, WindowAttnV2
from ._builder import build_staged, default_cfg, make_entrypoints
from ._staged import Stage, StagedNet, drop_path_rates

__all__ = ['PatchMerging', 'Swin', 'SwinBlock', 'SwinStage', 'checkpoint_filter_fn']

VERSIONS = (1, 2)


class PatchMerging(nn.Module):
    """Swin's patch merging on [B, H, W, C] -> [B, ⌈H/2⌉, ⌈W/2⌉, out_dim].

    The 2×2 neighbourhood of every output pixel is concatenated along channels (``x[0::2, 0::2]``, ``x[1::2, 0::2]``,
    ``x[0::2, 1::2]``, ``x[1::2, 1::2]``; an odd side is zero-padded first), then LayerNorm(4C) -> Linear(4C, out_dim)
    (Swin) or Linear(4C, out_dim) -> LayerNorm(out_dim) (``post_norm``: Swin V2); the linear has no bias.

    Args:
        dim: input channels C.
        out_dim: output channels (default 2C).
        post_norm: normalise after the reduction (Swin V2) instead of before it (Swin).
        device, dtype: factory arguments.
    """

    def __init__(self, dim: int, out_dim: int | None = None, post_norm: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.out_dim = out_dim or 2 * dim
        self.post_norm = post_norm
        self.norm = nn.LayerNorm(self.out_dim if post_norm else 4 * dim, **dd)
        self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False, **dd)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        H, W = x.shape[1], x.shape[2]
        # [B, H/2, 2 (row), W/2, 2 (column), C] -> [B, H/2, W/2, column, row, C]: the released order of the pieces
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        if self.post_norm:
            return self.norm(self.reduction(x))
        return self.reduction(self.norm(x))


class SwinBlock(nn.Module):
    """A Swin block on [B, H, W, C]: pre-norm (Swin) or res-post-norm (Swin V2) window attention, then the MLP.

    Args:
        dim: channels C.
        num_heads: attention heads.
        window_size: window side M.
        shift_size: window shift (0: W-MSA; M // 2 in the shifted blocks: SW-MSA).
        version: 1 (Swin: pre-norm, `WindowAttn`) or 2 (Swin V2: res-post-norm, `WindowAttnV2`).
        mlp_ratio: MLP hidden width / C.
        qkv_bias: biases in the q/k/v projection (Swin V2: on q and v).
        proj_drop: dropout after the attention and in the MLP.
        attn_drop: dropout on the attention weights.
        drop_path: stochastic depth of both residual branches.
        pretrained_window_size: of `WindowAttnV2` (version 2 only; 0: the window size).
        pad_mode: of the window attention, ``'mask'`` or ``'zeros'``.
        device, dtype: factory arguments.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            window_size: int = 7,
            shift_size: int = 0,
            version: int = 1,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            pretrained_window_size: int = 0,
            pad_mode: str = 'mask',
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if version not in VERSIONS:
            raise ValueError(f'version must be one of {VERSIONS}, got {version!r}')
        self.post_norm = version == 2
        attn_args = dict(num_heads=num_heads, window_size=window_size, shift_size=shift_size, qkv_bias=qkv_bias,
                         attn_drop=attn_drop, proj_drop=proj_drop, pad_mode=pad_mode, **dd)
        self.norm1 = nn.LayerNorm(dim, **dd)
        if version == 2:
            self.attn = WindowAttnV2(dim, pretrained_window_size=pretrained_window_size, **attn_args)
        else:
            self.attn = WindowAttn(dim, **attn_args)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop, **dd)

    def _window_attn(self, x: Tensor) -> Tensor:
        """The window attention of a [B, H, W, C] map (the blocks take NCHW maps: permuted views, no copy)."""
        return self.attn(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.post_norm:
            x = x + self.drop_path(self.norm1(self._window_attn(x)))
            return x + self.drop_path(self.norm2(self.mlp(x)))
        x = x + self.drop_path(self._window_attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinStage(Stage):
    """A stage: the patch merging (stages after the first), then blocks alternating shift 0 and ``M // 2``;
    [B, H, W, C] in and out."""

    def __init__(
            self,
            dim: int,
            depth: int,
            num_heads: int,
            drop_path: Sequence[float],
            downsample: bool,
            window_size: int = 7,
            version: int = 1,
            device=None,
            dtype=None,
            **block_kwargs: Any,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.downsample = PatchMerging(dim // 2, dim, post_norm=version == 2, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            SwinBlock(dim, num_heads, window_size, shift_size=window_size // 2 if j % 2 else 0, version=version,
                      drop_path=drop_path[j], **dd, **block_kwargs)
            for j in range(depth)])


class Swin(StagedNet):
    """Swin Transformer (``version=1``) or Swin Transformer V2 (``version=2``), timm's model interface.

    Args:
        depths: blocks per stage.
        num_heads: heads per stage.
        embed_dim: channels C of the first stage (doubled at every stage).
        window_size: window side M.
        version: 1 (Swin) or 2 (Swin V2: res-post-norm, scaled cosine attention with the continuous position bias,
            the norm of the patch merging after its reduction).
        mlp_ratio: MLP hidden width / channels.
        qkv_bias: biases of the q/k/v projection (Swin V2: q and v).
        pretrained_window_sizes: Swin V2, per stage, the window the position MLP was trained at (0: M).
        img_size: the default input size (any input runs).
        patch_size: side of the patch embedding (stride of the first stage).
        in_chans, num_classes, global_pool: timm's.
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after the attention and in the MLP.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth, growing linearly over the blocks from 0.
        pad_mode: window attention on sides that are not multiples of M: ``'mask'`` or ``'zeros'`` (`WindowAttn`).
        device, dtype: factory arguments.
    """

    _fi_nhwc = True
    _fi_formats = ('NCHW', 'NHWC')

    def __init__(
            self,
            depths: Sequence[int] = (2, 2, 6, 2),
            num_heads: Sequence[int] = (3, 6, 12, 24),
            embed_dim: int = 96,
            window_size: int = 7,
            version: int = 1,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            pretrained_window_sizes: Sequence[int] = (0, 0, 0, 0),
            img_size: int | tuple[int, int] = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.2,
            pad_mode: str = 'mask',
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        num_stages = len(depths)
        for name, value in (('num_heads', num_heads), ('pretrained_window_sizes', pretrained_window_sizes)):
            if len(value) != num_stages:
                raise ValueError(f'{name} must give one value per stage ({num_stages}), got {list(value)}')
        check_int('embed_dim', embed_dim)
        check_int('patch_size', patch_size)
        self.img_size = to_2tuple(img_size)
        self.version = version
        dims = [int(embed_dim * 2 ** i) for i in range(num_stages)]
        self.patch_embed = PatchEmbed(self.img_size, patch_size, in_chans, embed_dim, norm_layer=nn.LayerNorm,
                                      output_fmt='NHWC', strict_img_size=False, dynamic_img_pad=True, **dd)
        dpr = drop_path_rates(drop_path_rate, depths)  # the released linspace(0, rate, blocks)
        stages, self.feature_info = [], []
        for i in range(num_stages):
            stages.append(SwinStage(
                dims[i], depths[i], num_heads[i], dpr[i], downsample=i > 0,
                window_size=window_size, version=version, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, pretrained_window_size=pretrained_window_sizes[i],
                pad_mode=pad_mode, **dd))
            self.feature_info.append(dict(num_chs=dims[i], reduction=patch_size * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self._init_head(nn.LayerNorm(dims[-1], **dd), dims[-1], in_chans, num_classes, global_pool, drop_rate, **dd)
        self.init_weights()

    def init_weights(self) -> None:
        """The released initialisation: Linear trunc-normal (std 0.02) with zero bias, LayerNorm 1 / 0 (the relative
        tables are so initialised by the attention blocks); Swin V2: the blocks' post-norms 0 / 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.version == 2:
            for stage in self.stages:
                for blk in stage.blocks:
                    for norm in (blk.norm1, blk.norm2):
                        nn.init.zeros_(norm.weight)
                        nn.init.zeros_(norm.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The relative position tables (Swin), the position MLPs and logit scales (Swin V2): the released
        ``no_weight_decay_keywords``."""
        keys = ('relative_position_bias_table', 'cpb_mlp', 'logit_scale')
        return {n for n, _ in self.named_parameters() if any(k in n for k in keys)}


_DROPPED = ('relative_position_index', 'relative_coords_table', 'attn_mask')  # the released and timm's buffers


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: Swin) -> dict[str, Tensor]:
    """Map a timm Swin / Swin V2 state dict or a released checkpoint to this layout.

    ``layers.i.*`` -> ``stages.i.*``; in a released checkpoint (``layers.0.downsample`` present: the patch merging
    closes stage i) ``layers.i.downsample.*`` -> ``stages.{i+1}.downsample.*`` and ``head.*`` -> ``head.fc.*``; the
    buffers ``relative_position_index``, ``relative_coords_table`` and ``attn_mask`` are dropped. Relative tables of
    another window size than the model's are resized bicubically (timm's ``resize_rel_pos_bias_table``). A
    ``{'model': ...}`` or ``{'state_dict': ...}`` wrapper is unpacked; a state dict in this layout passes as is."""
    state_dict = state_dict.get('model', state_dict)
    state_dict = state_dict.get('state_dict', state_dict)
    if not any(k.startswith('layers.') for k in state_dict):
        return state_dict
    released = 'layers.0.downsample.reduction.weight' in state_dict
    own = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        if key.endswith(_DROPPED):
            continue
        if m := re.match(r'layers\.(\d+)\.(.*)', key):
            stage, rest = int(m.group(1)), m.group(2)
            if released and rest.startswith('downsample.'):
                stage += 1
            key = f'stages.{stage}.{rest}'
        elif released and key.startswith('head.') and not key.startswith('head.fc.'):
            key = 'head.fc.' + key[len('head.'):]
        if key.endswith('relative_position_bias_table') and key in own and own[key].shape != value.shape:
            side = model.get_submodule(key[:-len('.relative_position_bias_table')]).window_size
            value = resize_rel_pos_bias_table(value, new_window_size=(side, side), new_bias_shape=own[key].shape)
        out[key] = value
    return out


_V1 = '2103.14030'
_V2 = '2111.09883'
_MODELS: dict[str, tuple[dict[str, Any], str]] = {
    'swin_t': (dict(depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), embed_dim=96, drop_path_rate=0.2), _V1),
    'swin_s': (dict(depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), embed_dim=96, drop_path_rate=0.3), _V1),
    'swin_b': (dict(depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), embed_dim=128, drop_path_rate=0.5), _V1),
    'swinv2_t': (dict(depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), embed_dim=96, window_size=8, version=2,
                      img_size=256, drop_path_rate=0.2), _V2),
}

default_cfgs = generate_default_cfgs({
    name: default_cfg(arxiv, interpolation='bicubic', crop_pct=0.9, first_conv='patch_embed.proj',
                      classifier='head.fc', license='mit',
                      **(dict(input_size=(3, 256, 256), pool_size=(8, 8)) if args.get('img_size') == 256 else {}))
    for name, (args, arxiv) in _MODELS.items()
})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> Swin:
    return build_staged(Swin, variant, pretrained, _MODELS[variant][0], checkpoint_filter_fn, **kwargs)


make_entrypoints(__name__, _create, {name: arxiv for name, (_, arxiv) in _MODELS.items()})
