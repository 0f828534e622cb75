"""ViT-Small/16 with every registered token mixer as its attention: ``vit_small_patch16_224_<mixer>``.

Built on timm's ``VisionTransformer`` ("An Image is Worth 16x16 Words: Transformers for Image Recognition at
Scale", Dosovitskiy et al., ICLR 2021, arXiv:2010.11929) with ``attn_layer=`` the mixer class: patch 16, width
384, depth 12, 6 heads. One model is registered per mixer in ``visattn.list_mixers()`` when this module is
imported (so ``visattn.mixers`` is imported first). Mixers that need a fixed length get
``seq_len = (img_size / 16)² + prefix tokens`` (197 at 224²); grid mixers get ``feat_size = img_size / 16`` and
the prefix count, and follow the image size when the model is built with ``dynamic_img_size=True``.

``pretrained=True`` loads timm's ``vit_small_patch16_224.augreg_in21k_ft_in1k`` weights (from the Hugging Face
hub, or a local file given by ``pretrained_cfg_overlay=dict(file=...)``) where they fit: every tensor whose
name and shape match the model's (patch embedding, norms, MLPs, and the ``qkv`` / ``proj`` of mixers that keep
timm's layout) is loaded; the mixer's own parameters start fresh.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import to_2tuple
from timm.models import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from .._utils import bind_defaults
from ..mixers._base import GridMixer
from ..registry import get_mixer, info, list_mixers
from ._builder import build_checked, default_cfg, make_entrypoint

__all__ = ['vit_mixer_layer', 'track_grid', 'filter_fitting_weights']

_BASE = 'vit_small_patch16_224'
_ARGS = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)


def vit_mixer_layer(mixer: str, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 16,
                    num_prefix_tokens: int = 1) -> type:
    """The class to pass as timm ViT's ``attn_layer=`` for ``mixer``: the mixer class itself; for a mixer that
    needs ``seq_len``, a subclass whose ``seq_len`` defaults to the ViT's token count; for a grid mixer, a subclass
    whose ``feat_size`` defaults to the ViT's patch grid and ``num_prefix_tokens`` to its class and register tokens
    (``num_prefix_tokens = class_token + reg_tokens``)."""
    cls = get_mixer(mixer)
    meta = info(f'mixer:{mixer}')
    h, w = to_2tuple(img_size)
    ph, pw = to_2tuple(patch_size)
    gh, gw = h // ph, w // pw
    if meta.requires_grid:
        return bind_defaults(cls, f'Grid{gh}x{gw}p{num_prefix_tokens}', feat_size=(gh, gw),
                             num_prefix_tokens=num_prefix_tokens)
    if not meta.requires_seq_len:
        return cls
    seq_len = gh * gw + num_prefix_tokens
    return bind_defaults(cls, f'Len{seq_len}', seq_len=seq_len)


def track_grid(model: nn.Module) -> nn.Module:
    """Let the grid mixers of a timm ViT built with ``dynamic_img_size=True`` follow the input's size: before each
    patch embedding, every `GridMixer` in ``model`` is told the patch grid of the image (``dynamic_grid``).
    visattn's ``vit_small_patch16_224_<grid mixer>`` models call it themselves; call it on a ViT built by hand.
    Returns ``model``."""
    embed = getattr(model, 'patch_embed', None)
    if embed is None or not hasattr(embed, 'dynamic_feat_size'):
        raise TypeError(f'track_grid needs a timm VisionTransformer (with patch_embed), got {type(model).__name__}')
    grid_mixers = [m for m in model.modules() if isinstance(m, GridMixer)]

    def set_grid(module: nn.Module, args: tuple) -> None:
        gh, gw = module.dynamic_feat_size(tuple(args[0].shape[-2:]))
        for m in grid_mixers:
            m.dynamic_grid = (int(gh), int(gw))

    if grid_mixers and not getattr(model, '_visattn_tracks_grid', False):
        embed.register_forward_pre_hook(set_grid)
        model._visattn_tracks_grid = True
    return model


def filter_fitting_weights(state_dict: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """timm's ViT checkpoint filter (position embedding resizing, ...), then only the tensors whose name and
    shape match ``model``'s: the mixer's own parameters stay as initialised."""
    state_dict = checkpoint_filter_fn(state_dict, model)
    own = model.state_dict()
    return {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    mixer = variant[len(_BASE) + 1:]
    args = dict(_ARGS, **kwargs)
    prefix = int(args.get('class_token', True)) + args.get('reg_tokens', 0)
    args.setdefault('attn_layer', vit_mixer_layer(mixer, args.get('img_size', 224), args['patch_size'], prefix))
    out_indices = args.pop('out_indices', 3)
    model = build_checked(
        VisionTransformer, variant, pretrained, pretrained_filter_fn=filter_fitting_weights,
        pretrained_strict=False, feature_cfg=dict(out_indices=out_indices, feature_cls='getter'), **args)
    if args.get('dynamic_img_size', False):
        track_grid(model)
    return model


def _cfg(mixer: str) -> dict[str, Any]:
    return default_cfg(
        info(f'mixer:{mixer}').arxiv, hf_hub_id=f'timm/{_BASE}.augreg_in21k_ft_in1k', input_size=(3, 224, 224),
        pool_size=None, crop_pct=0.9, interpolation='bicubic', mean=IMAGENET_INCEPTION_MEAN,
        std=IMAGENET_INCEPTION_STD, first_conv='patch_embed.proj', classifier='head', fixed_input_size=True)


_MIXERS = list_mixers()
default_cfgs = generate_default_cfgs({f'{_BASE}_{m}': _cfg(m) for m in _MIXERS})

for _mixer in _MIXERS:
    _name = f'{_BASE}_{_mixer}'
    make_entrypoint(_name, __name__, _create, f'{_name}: ViT-S/16 with the {_mixer!r} token mixer '
                    f'(arXiv:{info("mixer:" + _mixer).arxiv}); see the docstring of {__name__}.')
