"""Deformable Attention Transformers (DAT-T / DAT-S / DAT-B), registered with timm.

Paper: "Vision Transformer with Deformable Attention", Xia, Pan, Song, Li, Huang, CVPR 2022, arXiv:2201.00520
(https://arxiv.org/abs/2201.00520). Configurations from the released code as published with the CVPR paper
(LeapLabTHU/DAT, ``models/dat.py``, ``models/dat_blocks.py`` and ``configs/dat_{tiny,small,base}.yaml`` before the
DAT++ update of 2023; the blocks are those `DeformableAttn` follows, commit 42b489e):

- patch embedding: a 4×4 stride-4 conv, then LayerNorm over channels (stride 4);
- four stages of pre-norm blocks, ``x + Attn(LN(x))`` then ``x + MLP(LN(x))`` (GELU MLP, ratio 4), with a conv patch
  merging (a 2×2 stride-2 conv without bias doubling the channels, then LayerNorm) between stages;
- stages 1-2 alternate local window and shifted window attention (`WindowAttn`, window 7); stages 3-4 alternate local
  window and deformable attention (`DeformableAttn`: offset range factor 2, stride r = 1, relative position bias on,
  offset kernel 5 in stage 3 and 3 in stage 4, the released ``ksizes[stage]``);
- DAT-T: C = 96, depths [2, 2, 6, 2] (3 and 1 deformable blocks in stages 3-4), heads [3, 6, 12, 24], groups 3 and 6,
  drop path 0.2: 28,319,138 parameters (the paper's table: 29M);
  DAT-S: C = 96, depths [2, 2, 18, 2] (9 and 1 deformable blocks), the same heads and groups, drop path 0.3:
  49,700,402 parameters (paper: 50M);
  DAT-B: C = 128, depths [2, 2, 18, 2], heads [4, 8, 16, 32], groups 4 and 8, drop path 0.5: 87,881,632 parameters
  (paper: 88M).

The counts are exactly those the released code builds for the released configurations (its buffers are not
parameters); DAT-T's 28.32M is printed 29M in the paper's table (S and B round to the printed 50M and 88M).

What follows the released code rather than the paper's text or Swin:

- the shifted windows are shifted by ``ceil(M / 2)`` = 4 for M = 7 (the released ``math.ceil(window_size / 2)``;
  Swin shifts by ``M // 2`` = 3);
- the initialisation is the released model's: PyTorch's defaults for every conv, linear and norm (the released init
  loop touches nothing), the window tables and the deformable tables ``trunc_normal(std=0.01)``;
- the deformable blocks have no attention dropout (``attn_drop_rate`` must then be 0; it is 0 in every released
  model); their output dropout is ``proj_drop_rate`` after the block.

Any input size runs: the window blocks pad and mask (``pad_mode``, `WindowAttn`; the released blocks need sides
that are multiples of 7 and the shifted mask of the training size), the deformable relative position table is built for
the stage's map at ``img_size`` (14 × 14 and 7 × 7 at 224², as the released code) and sampled at the size seen (the
released code only runs at that size). The stride-2 convs floor odd sides, as the released ones. The model works on
NCHW maps, as the released code (both blocks take NCHW; LayerNorm over channels): ``forward_features`` returns the
normalised last map [B, C, H/32, W/32] (``output_fmt = 'NCHW'``), ``features_only=True`` and
``forward_intermediates`` give NCHW maps at strides 4, 8, 16 and 32.

The module layout is timm's (``patch_embed``, ``stages.i.downsample`` opening stage i > 0, ``stages.i.blocks.j``
with ``norm1`` / ``attn`` / ``norm2`` / ``mlp``, ``norm``, ``head.fc``); `checkpoint_filter_fn` maps the released
checkpoints (``patch_proj``, ``stages.i.layer_norms`` / ``attns`` / ``mlps``, ``down_projs`` closing stage i,
``cls_norm``, ``cls_head``), which then load with ``pretrained_cfg_overlay=dict(file=...)``; the released weights are
linked from the README of LeapLabTHU/DAT (Google Drive / Tsinghua Cloud, ``dat_{tiny,small,base}_in1k_224.pth``).

Dropout names follow timm: ``drop_rate`` before the classifier, ``proj_drop_rate`` after the attention and in the MLP
(the released ``drop_rate``, 0 in every released model), ``attn_drop_rate`` on the window attention weights.
"""

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, Mlp, PatchEmbed, to_2tuple
from timm.models import generate_default_cfgs
from torch import Tensor

from ..layers.deformable import DeformableAttn
from ..layers.window import WindowAttn
from ._builder import build_staged, default_cfg, make_entrypoints
from ._staged import Stage, StagedNet, drop_path_rates

__all__ = ['DAT', 'DATBlock', 'DATStage', 'checkpoint_filter_fn']

LN_EPS = 1e-5  # the released nn.LayerNorm's (timm's LayerNorm2d defaults to 1e-6)
KINDS = ('L', 'S', 'D')  # local window, shifted window, deformable: the released ``stage_spec`` letters


class ConvDownsample(nn.Module):
    """DAT's patch merging: a 2×2 stride-2 conv without bias to ``out_dim`` channels, then LayerNorm; NCHW."""

    def __init__(self, dim: int, out_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.reduction = nn.Conv2d(dim, out_dim, 2, stride=2, bias=False, **dd)
        self.norm = LayerNorm2d(out_dim, eps=LN_EPS, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.reduction(x))


class DATBlock(nn.Module):
    """A DAT block on [B, C, H, W]: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))``.

    Args:
        dim: channels C.
        num_heads: attention heads.
        kind: ``'L'`` (local window), ``'S'`` (shifted window, shift ``ceil(M / 2)``) or ``'D'`` (deformable).
        window_size: window side M of the window blocks.
        n_groups, kernel_size, offset_range_factor, stride, use_pe, feat_size: of `DeformableAttn` (``'D'`` only).
        mlp_ratio: MLP hidden width / C.
        proj_drop: dropout after the attention and in the MLP.
        attn_drop: dropout on the window attention weights (must be 0 for ``'D'``).
        drop_path: stochastic depth of both residual branches.
        pad_mode: of `WindowAttn`.
        device, dtype: factory arguments.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            kind: str = 'L',
            window_size: int = 7,
            n_groups: int = 1,
            kernel_size: int = 5,
            offset_range_factor: float = 2.,
            stride: int = 1,
            use_pe: bool = True,
            feat_size: int | tuple[int, int] = 14,
            mlp_ratio: float = 4.,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            pad_mode: str = 'mask',
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if kind not in KINDS:
            raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
        self.kind = kind
        self.norm1 = LayerNorm2d(dim, eps=LN_EPS, **dd)
        if kind == 'D':
            if attn_drop > 0.:
                raise ValueError(f'deformable blocks have no attention dropout: attn_drop must be 0, got {attn_drop}')
            self.attn = DeformableAttn(
                dim, num_heads=num_heads, n_groups=n_groups, stride=stride, offset_range_factor=offset_range_factor,
                kernel_size=kernel_size, use_pe=use_pe, feat_size=feat_size, **dd)
            self.attn_drop_out = nn.Dropout(proj_drop) if proj_drop > 0. else nn.Identity()
        else:
            shift = math.ceil(window_size / 2) if kind == 'S' else 0
            self.attn = WindowAttn(dim, num_heads=num_heads, window_size=window_size, shift_size=shift,
                                   attn_drop=attn_drop, proj_drop=proj_drop, pad_mode=pad_mode, **dd)
            self.attn_drop_out = nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop, **dd)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn_drop_out(self.attn(self.norm1(x))))
        t = x.permute(0, 2, 3, 1)  # [B, H, W, C]: the MLP and its norm work over channels
        t = t + self.drop_path(self.mlp(self.norm2(t)))
        return t.permute(0, 3, 1, 2)


class DATStage(Stage):
    """A stage: the patch merging (stages after the first), then its blocks; [B, C, H, W] in and out."""

    def __init__(
            self,
            dim: int,
            kinds: Sequence[str],
            num_heads: int,
            drop_path: Sequence[float],
            downsample: bool,
            device=None,
            dtype=None,
            **block_kwargs: Any,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.downsample = ConvDownsample(dim // 2, dim, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            DATBlock(dim, num_heads, kind, drop_path=drop_path[i], **dd, **block_kwargs)
            for i, kind in enumerate(kinds)])


def _stage_spec(depths: Sequence[int], deformable_stages: Sequence[bool]) -> list[list[str]]:
    """The released ``stage_spec``: L, S, L, S, ... in window stages and L, D, L, D, ... in deformable stages."""
    return [[('D' if d else 'S') if j % 2 else 'L' for j in range(n)] for n, d in zip(depths, deformable_stages)]


class DAT(StagedNet):
    """Deformable Attention Transformer, timm's model interface.

    Args:
        depths: blocks per stage.
        num_heads: heads per stage.
        groups: offset groups per stage (used by the stages with deformable blocks).
        embed_dim: channels of the first stage (doubled at every stage).
        stage_spec: per stage, the kind of every block (``'L'``, ``'S'``, ``'D'``); default: L/S alternating in
            stages 1-2 and L/D alternating in stages 3-4, as every released model.
        mlp_ratio: MLP hidden width / channels.
        window_size: window side M of the window blocks.
        offset_kernels: per stage, the offset network's kernel (the released ``[9, 7, 5, 3]``).
        offset_range_factor: of the deformable blocks.
        offset_stride: stride r of the deformable blocks' offset network.
        use_pe: the deformable relative position bias.
        img_size: the training size the deformable tables are built for (the stage's map at it; any input runs).
        in_chans, num_classes, global_pool: timm's.
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after the attention and in the MLP.
        attn_drop_rate: dropout on the window attention weights (deformable blocks: must be 0).
        drop_path_rate: stochastic depth, growing linearly over the blocks from 0.
        pad_mode: window blocks on sides that are not multiples of M: ``'mask'`` or ``'zeros'`` (`WindowAttn`).
        device, dtype: factory arguments.
    """

    def __init__(
            self,
            depths: Sequence[int] = (2, 2, 6, 2),
            num_heads: Sequence[int] = (3, 6, 12, 24),
            groups: Sequence[int] = (1, 1, 3, 6),
            embed_dim: int = 96,
            stage_spec: Sequence[Sequence[str]] | None = None,
            mlp_ratio: float = 4.,
            window_size: int = 7,
            offset_kernels: Sequence[int] = (9, 7, 5, 3),
            offset_range_factor: float = 2.,
            offset_stride: int = 1,
            use_pe: bool = True,
            img_size: int | tuple[int, int] = 224,
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
        for name, value in (('num_heads', num_heads), ('groups', groups), ('offset_kernels', offset_kernels)):
            if len(value) != num_stages:
                raise ValueError(f'{name} must give one value per stage ({num_stages}), got {list(value)}')
        if stage_spec is None:
            stage_spec = _stage_spec(depths, [i >= 2 for i in range(num_stages)])
        stage_spec = [list(s) for s in stage_spec]
        if [len(s) for s in stage_spec] != list(depths):
            raise ValueError(f'stage_spec must give one kind per block of each stage (depths {list(depths)}), '
                             f'got {stage_spec}')
        self.img_size = to_2tuple(img_size)
        self.stage_spec = stage_spec
        dims = [int(embed_dim * 2 ** i) for i in range(num_stages)]
        self.patch_embed = PatchEmbed(
            self.img_size, 4, in_chans, embed_dim, norm_layer=lambda c, **kw: LayerNorm2d(c, eps=LN_EPS, **kw),
            output_fmt='NCHW', strict_img_size=False, **dd)
        dpr = drop_path_rates(drop_path_rate, depths)  # the released linspace(0, rate, blocks)
        stages, self.feature_info = [], []
        for i in range(num_stages):
            feat_size = tuple(max(s // 4 // 2 ** i, 1) for s in self.img_size)  # the released img_size // 4 // 2**i
            stages.append(DATStage(
                dims[i], stage_spec[i], num_heads[i], dpr[i], downsample=i > 0,
                window_size=window_size, n_groups=groups[i], kernel_size=offset_kernels[i],
                offset_range_factor=offset_range_factor, stride=offset_stride, use_pe=use_pe, feat_size=feat_size,
                mlp_ratio=mlp_ratio, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, pad_mode=pad_mode, **dd))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self._init_head(LayerNorm2d(dims[-1], eps=LN_EPS, **dd), dims[-1], in_chans, num_classes, global_pool,
                        drop_rate, **dd)
        self.init_weights()

    def init_weights(self) -> None:
        """The released model's initialisation: PyTorch's defaults for every conv, linear and norm; the window
        tables ``trunc_normal(std=0.01)`` (the deformable tables are so initialised by `DeformableAttn`)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
                m.reset_parameters()
            elif isinstance(m, WindowAttn):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.01)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The relative position tables (the released ``no_weight_decay_keywords``)."""
        return {n for n, _ in self.named_parameters() if n.endswith(('relative_position_bias_table', 'rpe_table'))}


_ATTN_RENAMES = {'proj_qkv.': 'qkv.', 'proj_out.': 'proj.'}  # the released window attention -> WindowAttn
_DROPPED = ('relative_position_index', 'attn_mask')  # the released window blocks' buffers


def _resize_table(value: Tensor, target: Tensor) -> Tensor:
    """A relative table resized bicubically to the model's, as the released ``load_pretrained``: a window table
    [(2M-1)², heads] as a square, a deformable table [heads, 2H-1, 2W-1] as it is."""
    if value.ndim == 2:
        n, heads = value.shape
        side, new_side = math.isqrt(n), math.isqrt(target.shape[0])
        grid = value.t().reshape(1, heads, side, side).float()
        out = F.interpolate(grid, (new_side, new_side), mode='bicubic')
        return out.reshape(heads, -1).t().to(value.dtype)
    out = F.interpolate(value[None].float(), target.shape[-2:], mode='bicubic')
    return out[0].to(value.dtype)


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: DAT) -> dict[str, Tensor]:
    """Map a released DAT checkpoint (the CVPR code) to this layout.

    ``patch_proj.0`` / ``patch_proj.1.norm`` -> ``patch_embed.proj`` / ``patch_embed.norm``;
    ``stages.i.layer_norms.{2j, 2j+1}.norm`` -> ``stages.i.blocks.j.norm{1,2}``; ``stages.i.attns.j`` ->
    ``stages.i.blocks.j.attn`` (window blocks: ``proj_qkv`` -> ``qkv``, ``proj_out`` -> ``proj``; their
    ``relative_position_index`` and ``attn_mask`` buffers dropped); ``stages.i.mlps.j.chunk.linear{1,2}`` ->
    ``stages.i.blocks.j.mlp.fc{1,2}``; ``down_projs.i.{0, 1.norm}`` (closing stage i) ->
    ``stages.{i+1}.downsample.{reduction, norm}``; ``cls_norm.norm`` -> ``norm``; ``cls_head`` -> ``head.fc``.
    Relative tables of another size than the model's are resized bicubically, as the released ``load_pretrained``.
    A ``{'model': ...}`` or ``{'state_dict': ...}`` wrapper is unpacked; a state dict in this layout passes as is."""
    state_dict = state_dict.get('model', state_dict)
    state_dict = state_dict.get('state_dict', state_dict)
    if not any(k.startswith(('patch_proj.', 'down_projs.', 'cls_head.')) for k in state_dict):
        return state_dict
    window = {m.group(1) for k in state_dict if (m := re.match(r'(stages\.\d+\.attns\.\d+)\.proj_qkv\.', k))}
    own = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        if key.endswith(_DROPPED):
            continue
        if m := re.match(r'patch_proj\.(0|1\.norm)\.(.*)', key):
            key = f'patch_embed.{"proj" if m.group(1) == "0" else "norm"}.{m.group(2)}'
        elif m := re.match(r'down_projs\.(\d+)\.(0|1\.norm)\.(.*)', key):
            part = 'reduction' if m.group(2) == '0' else 'norm'
            key = f'stages.{int(m.group(1)) + 1}.downsample.{part}.{m.group(3)}'
        elif m := re.match(r'stages\.(\d+)\.layer_norms\.(\d+)\.norm\.(.*)', key):
            k = int(m.group(2))
            key = f'stages.{m.group(1)}.blocks.{k // 2}.norm{k % 2 + 1}.{m.group(3)}'
        elif m := re.match(r'(stages\.(\d+)\.attns\.(\d+))\.(.*)', key):
            rest = m.group(4)
            if m.group(1) in window:
                for old, new in _ATTN_RENAMES.items():
                    if rest.startswith(old):
                        rest = new + rest[len(old):]
            key = f'stages.{m.group(2)}.blocks.{m.group(3)}.attn.{rest}'
        elif m := re.match(r'stages\.(\d+)\.mlps\.(\d+)\.chunk\.linear([12])\.(.*)', key):
            key = f'stages.{m.group(1)}.blocks.{m.group(2)}.mlp.fc{m.group(3)}.{m.group(4)}'
        elif key.startswith('cls_norm.norm.'):
            key = 'norm.' + key[len('cls_norm.norm.'):]
        elif key.startswith('cls_head.'):
            key = 'head.fc.' + key[len('cls_head.'):]
        if key.endswith(('relative_position_bias_table', 'rpe_table')) and key in own \
                and own[key].shape != value.shape:
            value = _resize_table(value, own[key])
        out[key] = value
    return out


_SIZES: dict[str, dict[str, Any]] = {
    'tiny': dict(depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), groups=(1, 1, 3, 6), embed_dim=96,
                 drop_path_rate=0.2),
    'small': dict(depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), groups=(1, 1, 3, 6), embed_dim=96,
                  drop_path_rate=0.3),
    'base': dict(depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), groups=(1, 1, 4, 8), embed_dim=128,
                 drop_path_rate=0.5),
}
_MODELS: dict[str, dict[str, Any]] = {f'dat_{size}': args for size, args in _SIZES.items()}
_ARXIV = '2201.00520'

default_cfgs = generate_default_cfgs({
    name: default_cfg(_ARXIV, interpolation='bicubic', crop_pct=0.875, first_conv='patch_embed.proj',
                      classifier='head.fc', license='apache-2.0')
    for name in _MODELS
})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> DAT:
    return build_staged(DAT, variant, pretrained, _MODELS[variant], checkpoint_filter_fn, **kwargs)


make_entrypoints(__name__, _create, dict.fromkeys(_MODELS, _ARXIV))
