"""sMLPNet: a four-stage MLP-like network with depth-wise convolution and sparse MLP token mixing, registered with timm.

Paper: "Sparse MLP for Image Recognition: Is Self-Attention Really Necessary?", Tang, Zhao, Wang, Luo, Zeng, AAAI
2022, arXiv:2109.05422. Configurations from the released code (microsoft/SPACH, ``models/smlp.py`` and
``models/registry.py``):

- a 4×4 stride-4 patch embedding (conv without bias, no norm); four stages with channels C, 2C, 4C, 8C; between
  stages a 2×2 stride-2 conv without bias doubling the channels (no norm); a final BatchNorm, global average pooling
  and a linear classifier;
- every block is ``x + DropPath(token_mix(x))`` then ``x + DropPath(channel_mix(x))``: the token mixer is
  BN-GELU-DWConv3×3 (no bias) followed by BN-GELU-sMLP (`SparseMlp` with its BatchNorm/GELU pre-activation: row
  and column mixing fused with the identity by a 1×1 conv), the channel mixer LayerNorm over channels then a GELU
  MLP of ratio α;
- T: C = 80, depths [2, 8, 14, 2], α = 3, drop path 0; S: C = 96, depths [2, 10, 24, 2], α = 3, drop path 0.2;
  B: C = 112, depths [2, 10, 24, 2], α = 3, drop path 0.3.

==============  ====================  ==========  =====================
variant         released name         parameters  paper (top-1, FLOPs)
==============  ====================  ==========  =====================
``smlpnet_t``   ``smlpnet_tiny``      24,123,584  24M (81.9, 5.0G)
``smlpnet_s``   ``smlpnet_small``     48,558,136  49M (83.1, 10.3G)
``smlpnet_b``   ``smlpnet_base``      65,880,408  66M (83.4, 14.0G)
==============  ====================  ==========  =====================

(at ``img_size=224``: the sMLP row and column maps of stage i are ``(img_size / 4 / 2^i)²``, 56, 28, 14 and 7 on
a side, so the count depends a little on ``img_size``.) The sMLP weights are built for the token grid at
``img_size`` (default 224) and resized by `SparseMlp` at other input sizes (bilinear, as a continuous kernel; see
``visattn.layers.smlp``); the released code only runs at its ``image_size``. Any input whose sides are multiples of
32 works.

Known differences from the released code: the module layout is timm's (``patch_embed``, ``stages.i.downsample``
opening stage i > 0, ``stages.i.blocks.j``, ``norm``, ``head.fc``); `checkpoint_filter_fn` maps the released
checkpoints (flat ``to_patch_embedding.i`` / ``token_mix.k`` / ``channel_mix.k`` lists over all blocks,
``batch_norm``, ``mlp_head.0``; the released ``proj_h`` mixes along W and ``proh_w`` along H: our ``proj_w`` and
``proj_h``), which then load with ``pretrained_cfg_overlay=dict(file=...)``; the released weights of S and B are at
``https://github.com/microsoft/SPACH/releases/download/v1.0/smlp_{s,b}.pth`` (none for T). Dropout names follow
timm: ``drop_rate`` before the classifier (the released code has none), ``proj_drop_rate`` in the channel MLP (the
released ``FeedForward`` dropout, 0 in every released model). The weights keep PyTorch's default initialisation,
as the released code. ``forward_features`` returns the normalised last map [B, 8C, H/32, W/32] (NCHW);
``features_only=True`` and ``forward_intermediates`` give NCHW maps at strides 4, 8, 16 and 32.
"""

import re
from collections.abc import Sequence
from typing import Any

import torch.nn as nn
from timm.layers import DropPath, Mlp, PatchEmbed, to_2tuple
from timm.models import generate_default_cfgs
from torch import Tensor

from ..layers.smlp import SparseMlp
from ._builder import build_staged, default_cfg, make_entrypoints
from ._staged import Stage, StagedNet, drop_path_rates

__all__ = ['SMLPNet', 'SMLPBlock', 'SMLPStage', 'checkpoint_filter_fn']


class SMLPBlock(nn.Module):
    """An sMLPNet block on [B, C, H, W]: ``x + DropPath(sMLP(DWConv(x)))``, then ``x + DropPath(MLP(LN(x)))``.

    Args:
        dim: channels C.
        feat_size: the (H, W) token grid the sMLP weights are built for.
        mlp_ratio: channel MLP hidden width / channels (the paper's α).
        proj_drop: dropout in the channel MLP.
        drop_path: stochastic depth of both branches.
        device, dtype: factory arguments.
    """

    def __init__(
            self,
            dim: int,
            feat_size: tuple[int, int],
            mlp_ratio: float = 3.,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.dw_norm = nn.BatchNorm2d(dim, **dd)
        self.dw_act = nn.GELU()
        self.dw_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False, **dd)
        self.smlp = SparseMlp(dim, feat_size=feat_size, norm_layer=nn.BatchNorm2d, act_layer=nn.GELU, **dd)
        self.norm = nn.LayerNorm(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.smlp(self.dw_conv(self.dw_act(self.dw_norm(x)))))
        y = self.mlp(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return x + self.drop_path(y)


class SMLPStage(Stage):
    """A stage: the 2×2 stride-2 downsampling conv (stages after the first), then its blocks; NCHW in and out."""

    def __init__(
            self,
            dim: int,
            depth: int,
            feat_size: tuple[int, int],
            drop_path: Sequence[float],
            downsample: bool,
            device=None,
            dtype=None,
            **block_kwargs: Any,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.downsample = nn.Conv2d(dim // 2, dim, 2, stride=2, bias=False, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            SMLPBlock(dim, feat_size, drop_path=drop_path[i], **dd, **block_kwargs) for i in range(depth)])


class SMLPNet(StagedNet):
    """sMLPNet, timm's model interface.

    Args:
        depths: blocks per stage.
        embed_dim: channels of the first stage (doubled at every stage).
        mlp_ratio: channel MLP hidden width / channels (the paper's α).
        img_size: the input size the sMLP weights are built for (the token grid ``img_size / 4 / 2^i`` in stage
            i); other input sizes get them resized.
        patch_size: of the patch embedding (default 4).
        in_chans, num_classes, global_pool: timm's.
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout in the channel MLPs.
        drop_path_rate: stochastic depth, growing linearly over the blocks from 0.
        device, dtype: factory arguments.
    """

    def __init__(
            self,
            depths: Sequence[int] = (2, 8, 14, 2),
            embed_dim: int = 80,
            mlp_ratio: float = 3.,
            img_size: int | tuple[int, int] = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if not depths or any(int(d) < 1 for d in depths):
            raise ValueError(f'depths must be a non-empty sequence of positive ints, got {depths!r}')
        num_stages = len(depths)
        self.img_size = to_2tuple(img_size)
        grids = [(max(1, self.img_size[0] // (patch_size * 2 ** i)), max(1, self.img_size[1] // (patch_size * 2 ** i)))
                 for i in range(num_stages)]
        dims = [int(embed_dim * 2 ** i) for i in range(num_stages)]
        self.patch_embed = PatchEmbed(
            img_size=None, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, bias=False, flatten=False,
            output_fmt='NCHW', strict_img_size=False, **dd)
        dpr = drop_path_rates(drop_path_rate, depths)  # the released linear rule
        stages, self.feature_info = [], []
        for i in range(num_stages):
            stages.append(SMLPStage(
                dims[i], depths[i], grids[i], dpr[i], downsample=i > 0, mlp_ratio=mlp_ratio,
                proj_drop=proj_drop_rate, **dd))
            self.feature_info.append(dict(num_chs=dims[i], reduction=patch_size * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self._init_head(nn.BatchNorm2d(dims[-1], **dd), dims[-1], in_chans, num_classes, global_pool, drop_rate,
                        **dd)


_BLOCK_KEYS = {  # the released per-block module paths -> ours
    'token_mix.{k}.0.conv_merge.BN.': 'dw_norm.',
    'token_mix.{k}.0.conv_merge.Conv.': 'dw_conv.',
    'token_mix.{k}.1.BN.': 'smlp.norm.',
    'token_mix.{k}.1.proj_h.': 'smlp.proj_w.',  # the released proj_h mixes along W
    'token_mix.{k}.1.proh_w.': 'smlp.proj_h.',  # and proh_w along H
    'token_mix.{k}.1.fuse.': 'smlp.fuse.',
    'channel_mix.{k}.1.': 'norm.',
    'channel_mix.{k}.2.net.0.': 'mlp.fc1.',
    'channel_mix.{k}.2.net.3.': 'mlp.fc2.',
}


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: SMLPNet) -> dict[str, Tensor]:
    """Map a released sMLPNet checkpoint to this layout: ``to_patch_embedding.0.0`` -> ``patch_embed.proj``,
    ``to_patch_embedding.i.0`` -> ``stages.i.downsample``, the flat ``token_mix.k`` / ``channel_mix.k`` (k over
    all blocks) -> ``stages.i.blocks.j`` (the sMLP's 1×1-conv axis maps [n, n, 1, 1] as [n, n] linear weights),
    ``batch_norm`` -> ``norm``, ``mlp_head.0`` -> ``head.fc``. A ``{'model': ...}`` or ``{'state_dict': ...}``
    wrapper is unpacked; a state dict in this layout passes as is."""
    state_dict = state_dict.get('model', state_dict)
    state_dict = state_dict.get('state_dict', state_dict)
    if not any(k.startswith('token_mix.') for k in state_dict):
        return state_dict
    where = [(i, j) for i, stage in enumerate(model.stages) for j in range(len(stage.blocks))]
    out = {}
    for key, value in state_dict.items():
        m = re.match(r'(token_mix|channel_mix)\.(\d+)\.(.*)', key)
        if m:
            k = int(m.group(2))
            i, j = where[k]
            for src, dst in _BLOCK_KEYS.items():
                src = src.format(k=k)
                if key.startswith(src):
                    key = f'stages.{i}.blocks.{j}.{dst}{key[len(src):]}'
                    break
            if '.smlp.proj_' in key and key.endswith('.weight'):
                value = value.reshape(value.shape[0], value.shape[1])
        elif key.startswith('to_patch_embedding.'):
            i = int(key.split('.')[1])
            key = 'patch_embed.proj.weight' if i == 0 else f'stages.{i}.downsample.weight'
        elif key.startswith('batch_norm.'):
            key = 'norm.' + key[len('batch_norm.'):]
        elif key.startswith('mlp_head.0.'):
            key = 'head.fc.' + key[len('mlp_head.0.'):]
        out[key] = value
    return out


_MODELS: dict[str, dict[str, Any]] = {
    'smlpnet_t': dict(embed_dim=80, depths=(2, 8, 14, 2), mlp_ratio=3., drop_path_rate=0.),
    'smlpnet_s': dict(embed_dim=96, depths=(2, 10, 24, 2), mlp_ratio=3., drop_path_rate=0.2),
    'smlpnet_b': dict(embed_dim=112, depths=(2, 10, 24, 2), mlp_ratio=3., drop_path_rate=0.3),
}
_ARXIV = '2109.05422'

default_cfgs = generate_default_cfgs({
    name: default_cfg(_ARXIV, interpolation='bicubic', first_conv='patch_embed.proj', classifier='head.fc',
                      license='mit')
    for name in _MODELS
})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> SMLPNet:
    return build_staged(SMLPNet, variant, pretrained, _MODELS[variant], checkpoint_filter_fn, **kwargs)


make_entrypoints(__name__, _create, dict.fromkeys(_MODELS, _ARXIV))
