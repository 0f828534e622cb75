"""VOLO (Vision Outlooker) backbones D1-D5 on visattn's outlook attention, registered with timm.

Paper: "VOLO: Vision Outlooker for Visual Recognition", Yuan, Hou, Jiang, Feng, Yan, TPAMI 2022, arXiv:2106.13112
(https://arxiv.org/abs/2106.13112). Configurations from the paper and the released code (sail-sg/volo,
``models/volo.py``), as timm's ``volo_d{1..5}_224``:

- conv stem: a 7×7 stride-2 conv and two 3×3 convs (``stem_hidden_dim`` channels, no bias, each followed by
  BatchNorm and ReLU), then a (patch/2)×(patch/2) stride-(patch/2) conv to the first width: stride 8 (patch 8);
- stage 1, the outlookers on the stride-8 map: ``x + OA(LN(x))``, ``x + MLP(LN(x))`` (GELU MLP), the outlook
  attention `OutlookAttn` with window 3 and stride 2 (its weights predicted from 2×2-average-pooled tokens, a window
  every second token: the released ``out_stride=2``);
- a 2×2 stride-2 conv to stride 16 (opening stage 2 here), then the learned position embedding (a [1, H/16, W/16, C]
  grid, trunc-normal std 0.02) and three stages of plain pre-norm transformer blocks (timm's ``Attention``: global
  multi-head self-attention, no qkv bias) at the same width;
- two class-attention blocks (``post_layers=('ca', 'ca')``): a class token (trunc-normal std 0.02) prepended to the
  tokens; in each block only the class token is the query (``q`` from it, ``kv`` from every token) and only it is
  updated (``cls + CA(LN(x))``, then ``cls + MLP(LN(cls))``); final LayerNorm;
- the class token's classifier ``head`` and the token-labeling auxiliary classifier ``aux_head`` on every patch
  token; the logits are ``head(cls) + 0.5 · max over tokens of aux_head(tokens)`` (the released inference rule,
  timm's ``forward_head``).

Sizes (layers of the four stages, widths, heads, MLP ratio; stem 64 channels except D5), parameters and multiply-adds
at 224²: D1 [4, 4, 8, 2], [192, 384, 384, 384], [6, 12, 12, 12], ratio 3: 26,632,040, 6.92 G (the paper's 27M,
6.8 G); D2 [6, 4, 10, 4], [256, 512, 512, 512], [8, 16, 16, 16], ratio 3: 58,678,336, 14.31 G (59M, 14.1 G); D3
[8, 8, 16, 4], D2's widths and heads: 86,325,072, 20.73 G (86M, 20.6 G); D4 [8, 8, 16, 4], [384, 768, 768, 768],
[12, 16, 16, 16], ratio 3: 192,961,520, 44.26 G (193M, 43.8 G); D5 [12, 12, 20, 4], D4's widths and heads, ratio 4,
stem 128 channels: 295,455,584, 72.30 G (296M, 69.0 G). The paper's D5 figures differ from the released model
they name: its 296M is D5's count at the fine-tuned 448² / 512² (the larger position embedding: 295.91M / 296.09M),
its 69.0 G is D5 with the 64-channel stem of D1-D4 (69.10 G; the released 128-channel stem adds 3.2 G). The
counts are exactly timm's (`checkpoint_filter_fn` loads its state dicts and the released checkpoints). Stochastic
depth (default 0, the released and timm's default; the released recipes train D1 / D2 / D3 with 0.1 / 0.2 / 0.5:
``drop_path_rate=``) grows linearly over all layers of the four stages, as the released code counts them, and the
outlookers and the class attention have none (the released code passes no rate to them).

Any input size runs; sizes that are multiples of 16 are the paper's grid. The convs floor other sizes (the bottom /
right pixels that do not fill a patch are dropped, as in the released code: 100×90 gives 12×11 and 6×5 maps). The
position embedding is sized for ``img_size`` (default 224: 14×14) and resized bicubically to the stride-16 map where
it differs (the released fine-tuning resize: ``align_corners=False``, no antialiasing, computed in at least float32),
at every forward; a checkpoint's embedding of another grid is resized the same way when it loads.

What differs from the released code and timm's ``VOLO``: any input size runs (timm's is fixed to ``img_size``); the
MixToken training path (``use_mix_token`` / ``forward_train``: patches swapped between images and the auxiliary
outputs returned per token for the token-labeling loss) is left out, ``forward`` always returns the logits of the
inference rule, in training too (as timm's ``forward``). ``norm=True`` in ``forward_intermediates`` normalises the
last stage's tap only (the rule of every visattn backbone; timm's VOLO normalises every tap after the outlookers).

The module layout is visattn's staged one: ``patch_embed`` (``conv``, ``proj``), ``stages.i`` (``downsample``,
``pos_embed`` in stage 1, ``blocks.j``), ``cls_token``, ``post_network.j``, ``norm``, ``head``, ``aux_head``; the
parameters of every block have timm's and the released names. `checkpoint_filter_fn` maps timm's and the released
layout (``network.n``: the outlooker stage, the downsampling conv and the three transformer stages as entries
0-4, ``pos_embed`` at the top). The released weights are linked from the README of sail-sg/volo
(``d1_224_84.2.pth.tar``, ...) and load with ``pretrained_cfg_overlay=dict(file=...)``.

``forward_features`` returns the normalised tokens [B, 1 + H/16 · W/16, C] (class token first, as timm's VOLO);
``features_only=True`` and ``forward_intermediates`` give the NCHW maps after each of the four stages (strides 8,
16, 16, 16). Dropout names follow timm: ``drop_rate`` before the classifiers (and in the class blocks' MLP),
``pos_drop_rate`` after the position embedding, ``attn_drop_rate`` on the attention weights of every block.
"""

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import (
    Attention,
    DropPath,
    Mlp,
    get_device_dtype,
    register_notrace_function,
    register_notrace_module,
    to_2tuple,
    trunc_normal_,
)
from timm.models import generate_default_cfgs
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from torch import Tensor

from .._utils import check_int
from ..layers.outlook import OutlookAttn
from ._builder import build_staged, default_cfg, make_entrypoints
from ._staged import Stage, StagedNet, drop_path_rates

__all__ = ['VOLO', 'OutlookAttnNHWC', 'Outlooker', 'TransformerBlock', 'ClassBlock', 'checkpoint_filter_fn']

POOLS = ('', 'avg', 'token')


class ConvStem(nn.Module):
    """VOLO's patch embedding: three conv-BN-ReLU (7×7 stride 2, 3×3, 3×3), then a (patch/2)-strided conv;
    [B, C_in, H, W] -> [B, H/patch, W/patch, embed_dim] (channels-last)."""

    def __init__(self, in_chans: int, hidden_dim: int, embed_dim: int, patch_size: int = 8, device=None,
                 dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        layers: list[nn.Module] = []
        for i, k in enumerate((7, 3, 3)):
            layers += [nn.Conv2d(in_chans if i == 0 else hidden_dim, hidden_dim, k, stride=2 if i == 0 else 1,
                                 padding=k // 2, bias=False, **dd),
                       nn.BatchNorm2d(hidden_dim, **dd), nn.ReLU(inplace=True)]
        self.conv = nn.Sequential(*layers)
        self.proj = nn.Conv2d(hidden_dim, embed_dim, patch_size // 2, stride=patch_size // 2, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.conv(x)).permute(0, 2, 3, 1)


class Downsample(nn.Module):
    """A 2×2 stride-2 conv between stages; [B, H, W, C] -> [B, H/2, W/2, out_dim]."""

    def __init__(self, dim: int, out_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, out_dim, 2, stride=2, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


@register_notrace_module  # shape-dependent Python inside, as every visattn block: a leaf of timm's fx tracer
class OutlookAttnNHWC(OutlookAttn):
    """`OutlookAttn` called on a channels-last map, x: [B, H, W, C] -> [B, H, W, C] (its ``forward_nhwc``; the same
    parameters and function). A module call, so that hooks, the fx tracer and the zoo's counter see the block."""

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_nhwc(x)


class Outlooker(nn.Module):
    """VOLO's outlooker on [B, H, W, C]: ``x + OA(LN(x))``, then ``x + MLP(LN(x))``; OA is `OutlookAttn`
    (`OutlookAttnNHWC`: its channels-last entry)."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            kernel_size: int = 3,
            stride: int = 2,
            mlp_ratio: float = 3.,
            qkv_bias: bool = False,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: type[nn.Module] = nn.GELU,
            norm_layer: type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = OutlookAttnNHWC(dim, num_heads=num_heads, kernel_size=kernel_size, stride=stride,
                                    qkv_bias=qkv_bias, attn_drop=attn_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class TransformerBlock(nn.Module):
    """A pre-norm transformer block on the tokens of [B, H, W, C]: ``x + MHSA(LN(x))``, ``x + MLP(LN(x))``."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 3.,
            qkv_bias: bool = False,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: type[nn.Module] = nn.GELU,
            norm_layer: type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        x = x + self.drop_path1(self.attn(self.norm1(x).reshape(B, H * W, C)).reshape(B, H, W, C))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class ClassAttention(nn.Module):
    """Class attention: the class token (token 0) attends to every token; [B, N, C] -> [B, 1, C]."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.,
                 proj_drop: float = 0., device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if dim % num_heads:
            raise ValueError(f'num_heads must divide dim={dim}, got {num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias, **dd)
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = self.q(x[:, :1]).reshape(B, 1, self.num_heads, self.head_dim).transpose(1, 2)  # [B, heads, 1, D]
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(B, 1, C)))


class ClassBlock(nn.Module):
    """A class-attention block on [B, N, C]: only the class token changes, ``cls + CA(LN(x))``, then
    ``cls + MLP(LN(cls))``."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 3.,
            qkv_bias: bool = False,
            drop: float = 0.,
            attn_drop: float = 0.,
            act_layer: type[nn.Module] = nn.GELU,
            norm_layer: type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = ClassAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop, **dd)
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop, **dd)

    def forward(self, x: Tensor) -> Tensor:
        cls = x[:, :1]
        cls = cls + self.attn(self.norm1(x))
        cls = cls + self.mlp(self.norm2(cls))
        return torch.cat([cls, x[:, 1:]], dim=1)


@torch.fx.wrap
@register_notrace_function
def add_pos_embed(x: Tensor, pos_embed: Tensor) -> Tensor:
    """``x`` [B, H, W, C] plus ``pos_embed`` [1, h, w, C], resized bicubically to (H, W) where it differs (the
    released resize: ``align_corners=False``, no antialiasing; in at least float32)."""
    H, W = x.shape[1], x.shape[2]
    if pos_embed.shape[1] != H or pos_embed.shape[2] != W:
        pos = pos_embed.permute(0, 3, 1, 2).to(torch.promote_types(pos_embed.dtype, torch.float32))
        pos = F.interpolate(pos, size=(H, W), mode='bicubic', align_corners=False)
        pos_embed = pos.permute(0, 2, 3, 1).to(x.dtype)
    return x + pos_embed


class VOLOStage(Stage):
    """A stage on [B, H, W, C]: ``downsample`` (a 2×2 conv or identity), the position embedding (stage 1 only: it
    follows the outlookers), then ``blocks``."""

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None = None,
                 pos_grid: tuple[int, int] | None = None, dim: int = 0, pos_drop: float = 0., device=None,
                 dtype=None) -> None:
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        if pos_grid is not None:
            self.pos_embed = nn.Parameter(torch.zeros(1, *pos_grid, dim, device=device, dtype=dtype))
        else:
            self.register_parameter('pos_embed', None)
        self.pos_drop = nn.Dropout(pos_drop)
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        if self.pos_embed is not None:
            x = self.pos_drop(add_pos_embed(x, self.pos_embed))
        return self._run_blocks(x)


def _per_stage(name: str, value: Any, n: int) -> list:
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value] * n
    if len(values) != n:
        raise ValueError(f'{name} must give one value per stage ({n}), got {values}')
    return values


class VOLO(StagedNet):
    """Vision Outlooker, timm's model interface.

    ``forward_intermediates`` / ``prune_intermediate_layers``: the taps are the four stage outputs (``feature_info``:
    strides 8, 16, 16, 16), returned NCHW; ``norm`` normalises the last one. Pruning a stage or the head also drops
    the class token, the class-attention blocks and the auxiliary classifier.

    Args:
        layers: blocks per stage.
        embed_dims: width per stage (a stage without ``downsamples`` before it keeps the previous width).
        num_heads: heads per stage.
        mlp_ratio: MLP hidden width / width, one value or one per stage (the class blocks take the last).
        stem_hidden_dim: channels of the conv stem.
        patch_size: stride of the patch embedding (4, 8 or 16).
        downsamples: per stage, a 2×2 stride-2 conv after it (the last stage cannot).
        outlook_attention: per stage, outlookers (True) or transformer blocks (False).
        outlook_kernel: window of the outlook attention.
        outlook_stride: pooling of the outlook attention's weights and stride of its windows.
        img_size: the size the position embedding is made for (any input runs: it is resized).
        in_chans, num_classes: timm's.
        global_pool: ``'token'`` (the class token), ``'avg'`` (the mean of every token, timm's) or ``''``.
        qkv_bias: biases of the value / qkv / q, kv projections.
        drop_rate: dropout before the classifiers and in the class blocks.
        pos_drop_rate: dropout after the position embedding.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth of the transformer blocks (linear over all layers from 0).
        post_layers: the blocks on the class token, ``'ca'`` each (empty: no class token, ``global_pool='avg'``).
        use_aux_head: the token-labeling classifier (its max over tokens, halved, is added to the logits).
        norm_layer: the norm over channels.
        device, dtype: factory arguments.
    """

    _fi_nhwc = True

    def __init__(
            self,
            layers: Sequence[int] = (4, 4, 8, 2),
            embed_dims: Sequence[int] = (192, 384, 384, 384),
            num_heads: Sequence[int] = (6, 12, 12, 12),
            mlp_ratio: float | Sequence[float] = 3.,
            stem_hidden_dim: int = 64,
            patch_size: int = 8,
            downsamples: Sequence[bool] = (True, False, False, False),
            outlook_attention: Sequence[bool] = (True, False, False, False),
            outlook_kernel: int = 3,
            outlook_stride: int = 2,
            img_size: int | tuple[int, int] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            qkv_bias: bool = False,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            post_layers: Sequence[str] | None = ('ca', 'ca'),
            use_aux_head: bool = True,
            norm_layer: type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        n = len(layers)
        embed_dims = _per_stage('embed_dims', embed_dims, n)
        num_heads = _per_stage('num_heads', num_heads, n)
        mlp_ratios = _per_stage('mlp_ratio', mlp_ratio, n)
        downsamples = [bool(d) for d in _per_stage('downsamples', downsamples, n)]
        outlook_attention = [bool(o) for o in _per_stage('outlook_attention', outlook_attention, n)]
        if n < 2:
            raise ValueError(f'layers must give at least 2 stages (the position embedding opens stage 1), got {n}')
        if downsamples[-1]:
            raise ValueError('downsamples: the last stage has no stage after it to downsample into')
        for i in range(1, n):
            if not downsamples[i - 1] and embed_dims[i] != embed_dims[i - 1]:
                raise ValueError(f'embed_dims: stage {i} has no downsampling before it, so it must keep the width '
                                 f'{embed_dims[i - 1]}, got {embed_dims[i]}')
        if patch_size not in (4, 8, 16):
            raise ValueError(f'patch_size must be 4, 8 or 16, got {patch_size}')
        check_int('stem_hidden_dim', stem_hidden_dim)
        if global_pool not in POOLS:
            raise ValueError(f'global_pool must be one of {POOLS}, got {global_pool!r}')
        if post_layers is not None and any(p != 'ca' for p in post_layers):
            raise ValueError(f"post_layers must be 'ca' blocks (class attention), got {list(post_layers)}")
        if global_pool == 'token' and not post_layers:
            raise ValueError("global_pool='token' needs the class token of post_layers")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.img_size = to_2tuple(img_size)
        self.downsamples = downsamples
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False
        self.patch_embed = ConvStem(in_chans, stem_hidden_dim, embed_dims[0], patch_size, **dd)

        dpr = drop_path_rates(drop_path_rate, layers)
        stages, self.feature_info = [], []
        reduction = patch_size
        for i in range(n):
            downsample = None
            if i > 0 and downsamples[i - 1]:
                downsample = Downsample(embed_dims[i - 1], embed_dims[i], **dd)
                reduction *= 2
            blocks: list[nn.Module] = []
            for j in range(layers[i]):
                if outlook_attention[i]:
                    blocks.append(Outlooker(
                        embed_dims[i], num_heads[i], kernel_size=outlook_kernel, stride=outlook_stride,
                        mlp_ratio=mlp_ratios[i], qkv_bias=qkv_bias, attn_drop=attn_drop_rate, norm_layer=norm_layer,
                        **dd))
                else:  # the released rate: the layer's index over every stage's layers
                    blocks.append(TransformerBlock(
                        embed_dims[i], num_heads[i], mlp_ratio=mlp_ratios[i], qkv_bias=qkv_bias,
                        attn_drop=attn_drop_rate, drop_path=dpr[i][j],
                        norm_layer=norm_layer, **dd))
            grid = None
            if i == 1:
                grid = (self.img_size[0] // reduction, self.img_size[1] // reduction)
            stages.append(VOLOStage(blocks, downsample, grid, embed_dims[i], pos_drop_rate, **dd))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)

        if post_layers:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[-1], **dd))
            self.post_network = nn.ModuleList([
                ClassBlock(embed_dims[-1], num_heads[-1], mlp_ratio=mlp_ratios[-1], qkv_bias=qkv_bias,
                           attn_drop=attn_drop_rate, norm_layer=norm_layer, **dd)
                for _ in post_layers])
        else:
            self.register_parameter('cls_token', None)
            self.post_network = None
        self.num_prefix_tokens = 1 if post_layers else 0
        self.use_aux_head = use_aux_head
        self.norm = norm_layer(self.num_features, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.aux_head = nn.Linear(self.num_features, num_classes, **dd) if use_aux_head and num_classes > 0 else None
        self.init_weights()

    def init_weights(self) -> None:
        """The released initialisation: Linear trunc-normal (std 0.02) with zero bias, LayerNorm 1 / 0, the class
        token and the position embedding trunc-normal (std 0.02); convs and BatchNorm as built."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name == 'cls_token' or name.endswith('pos_embed'):
                trunc_normal_(p, std=.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The class token and the position embedding (the released ``no_weight_decay``)."""
        return {n for n, _ in self.named_parameters() if n == 'cls_token' or n.endswith('pos_embed')}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r'^patch_embed|^stages\.\d+\.pos_embed',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
            ],
            blocks2=[(r'^cls_token', (0,)), (r'^post_network\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in POOLS:
                raise ValueError(f'global_pool must be one of {POOLS}, got {global_pool!r}')
            if global_pool == 'token' and self.cls_token is None:
                raise ValueError("global_pool='token' needs the class token (pruned or not built)")
            self.global_pool = global_pool
        self.num_classes = num_classes
        dd = get_device_dtype(self)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)
        if self.use_aux_head and num_classes > 0:
            self.aux_head = nn.Linear(self.num_features, num_classes, **dd)
            self.aux_head.train(self.training)
        else:
            self.aux_head = None

    def _finish(self, x: Tensor) -> Tensor:
        """The last map [B, H, W, C] -> the normalised tokens [B, prefix + H·W, C] (class attention first)."""
        B, H, W, C = x.shape
        x = x.reshape(B, H * W, C)
        if self.cls_token is not None and self.post_network is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
            for blk in self.post_network:
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = checkpoint(blk, x)
                else:
                    x = blk(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == 'avg':
            out = x.mean(dim=1)
        elif self.global_pool == 'token':
            out = x[:, 0]
        else:
            out = x
        out = self.head_drop(out)
        if pre_logits:
            return out
        out = self.head(out)
        if self.aux_head is not None and self.global_pool != '':
            aux = self.aux_head(self.head_drop(x[:, self.num_prefix_tokens:]))  # a class score per token
            out = out + 0.5 * aux.max(1)[0]
        return out

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last one in ``indices`` and, with the head (``prune_head``, or when a stage
        goes), the class token, the class-attention blocks and the auxiliary classifier; the norm if asked (or
        when a stage goes). Returns the indices of the stages to take."""
        _, max_index = feature_take_indices(len(self.stages), indices)
        if prune_head or max_index < len(self.stages) - 1:
            self.cls_token = None
            self.post_network = None
            self.num_prefix_tokens = 0
            self.use_aux_head = False
        return super().prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)


def _resize_pos_embed(pos: Tensor, grid: Sequence[int]) -> Tensor:
    """A [1, h, w, C] embedding resized bicubically to ``grid`` (the released resize), in its dtype."""
    if tuple(pos.shape[1:3]) == tuple(grid):
        return pos
    out = F.interpolate(pos.permute(0, 3, 1, 2).to(torch.promote_types(pos.dtype, torch.float32)),
                        size=tuple(grid), mode='bicubic', align_corners=False)
    return out.permute(0, 2, 3, 1).to(pos.dtype)


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: VOLO) -> dict[str, Tensor]:
    """Map a timm or released VOLO state dict to this layout.

    The released checkpoint is ``{'state_dict': ...}`` (``module.`` prefixes are stripped). ``network.n`` counts
    the stages and the downsampling convs between them in order (0: the outlookers, 1: the conv, 2-4: the
    transformer stages for D1-D5): stage i's blocks -> ``stages.i.blocks``, the conv after stage i ->
    ``stages.{i+1}.downsample``; ``pos_embed`` -> ``stages.1.pos_embed``, resized bicubically to the model's grid
    where it differs (the released fine-tuning resize). A state dict in this layout passes with its embedding
    resized the same way."""
    state_dict = state_dict.get('state_dict', state_dict)
    state_dict = state_dict.get('model', state_dict)
    state_dict = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}
    own = model.state_dict()
    index, n = {}, 0
    for i, down in enumerate(model.downsamples):
        index[n] = f'stages.{i}.blocks'
        n += 1
        if down:
            index[n] = f'stages.{i + 1}.downsample'
            n += 1
    out = {}
    for key, value in state_dict.items():
        if key.startswith('network.'):
            _, num, rest = key.split('.', 2)
            key = f'{index[int(num)]}.{rest}'
        elif key == 'pos_embed':
            key = 'stages.1.pos_embed'
        if key.endswith('pos_embed') and key in own and own[key].shape != value.shape:
            value = _resize_pos_embed(value, own[key].shape[1:3])
        out[key] = value
    return out


_ARXIV = '2106.13112'
_MODELS: dict[str, dict[str, Any]] = {
    'volo_d1': dict(layers=(4, 4, 8, 2), embed_dims=(192, 384, 384, 384), num_heads=(6, 12, 12, 12)),
    'volo_d2': dict(layers=(6, 4, 10, 4), embed_dims=(256, 512, 512, 512), num_heads=(8, 16, 16, 16)),
    'volo_d3': dict(layers=(8, 8, 16, 4), embed_dims=(256, 512, 512, 512), num_heads=(8, 16, 16, 16)),
    'volo_d4': dict(layers=(8, 8, 16, 4), embed_dims=(384, 768, 768, 768), num_heads=(12, 16, 16, 16)),
    'volo_d5': dict(layers=(12, 12, 20, 4), embed_dims=(384, 768, 768, 768), num_heads=(12, 16, 16, 16),
                    mlp_ratio=4., stem_hidden_dim=128),
}

default_cfgs = generate_default_cfgs({
    name: default_cfg(_ARXIV, pool_size=None, crop_pct=0.96, interpolation='bicubic',
                      first_conv='patch_embed.conv.0', classifier=('head', 'aux_head'))
    for name in _MODELS
})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> VOLO:
    return build_staged(VOLO, variant, pretrained, _MODELS[variant], checkpoint_filter_fn, **kwargs)


make_entrypoints(__name__, _create, dict.fromkeys(_MODELS, _ARXIV))
