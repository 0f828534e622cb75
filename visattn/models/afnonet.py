"""AFNONet: the isotropic GFNet layout with Adaptive Fourier Neural Operator token mixing, registered with timm.

Paper: "Adaptive Fourier Neural Operators: Efficient Token Mixers for Transformers", Guibas, Mardani, Li, Tao,
Anandkumar, Catanzaro, ICLR 2022, arXiv:2111.13587. The ImageNet-1k backbone is the released classification code's
(NVlabs/AFNO-transformer, ``classification/afnonet.py`` and ``main_afnonet.py``, "based on ... GFNet"): GFNet's
isotropic network (`visattn.models.gfnet.GFNet`: patch embedding, learnable absolute position embedding, blocks
``x + MLP(LN(AFNO(LN(x))))``, a final LayerNorm (eps 1e-6) and global average pooling) with the global filter
replaced by the released ``AFNO2D`` (visattn's `AFNO2d`: block-diagonal complex MLP, soft threshold λ = 0.01, all
modes kept, hidden factor 1, its own residual ``+ x``). The configuration is the released training command and
defaults: C = 256, 12 blocks, k = 4 AFNO blocks (``--hidden-size 256 --num-layers 12 --fno-blocks 4``), MLP ratio 4,
a 4×4 stride-4 patch embedding (``patch_size=4`` in ``main_afnonet.py``: 56×56 tokens at 224²), drop path 0.1 (its
default ``--drop-path``), growing linearly over the blocks.

==============  ==========  =======================================================================
variant         parameters  paper
==============  ==========  =======================================================================
``afnonet_ti``  8,190,696   not established: the paper's ImageNet table could not be read here
==============  ==========  =======================================================================

(at ``img_size=224``; the position embedding, 56·56·256 = 802,816 of them, is built for the token grid at
``img_size``.) The parameter test checks this count against the released configuration, not against a figure
printed in the paper. Any input whose sides are multiples of ``patch_size`` (4) works; on another grid the position
embedding is resized bicubically (GFNet's rule, see `visattn.models.gfnet`); the AFNO mixer has no size-dependent
weights.

Known differences from the released code: the released block has a ``--double-skip`` option (a second residual
around the mixer, off by default) that is not provided; the released ``AFNO2D`` takes the token sequence [B, N, C]
and assumes a square grid (``H = W = sqrt(N)``), this one runs on the [B, H, W, C] map (any H × W) and computes in
``promote_types(x.dtype, float32)`` (the released: float32); its ``hard_thresholding_fraction`` keeps
``int((W // 2 + 1) · fraction)`` modes where the released code takes ``N // 2 + 1`` (the same at the default, 1.0:
all modes). Module names follow the released ones (``patch_embed.proj``, ``pos_embed``, ``blocks.i.{norm1, filter,
norm2, mlp}``, ``norm``) except the classifier, ``head.fc``; `checkpoint_filter_fn` (GFNet's) maps ``head`` and
resizes ``pos_embed``. No ImageNet weights are published. Dropout names follow timm as in GFNet (``drop_rate``
before the classifier, the released ``dropcls``; ``proj_drop_rate`` and ``pos_drop_rate``, the released
``drop_rate``). ``forward_features`` returns the normalised map [B, H/4, W/4, C] (NHWC); ``features_only=True``
and ``forward_intermediates`` give NCHW maps after any block (by default the last block of each quarter).
"""

from typing import Any

import torch.nn as nn
from timm.layers import LayerNorm
from timm.models import generate_default_cfgs
from torch import Tensor

from ..layers.afno import AFNO2d, afno_2d
from ._builder import build_checked, default_cfg, make_entrypoint, paper_id
from .gfnet import GFNet, _quarter_ends, checkpoint_filter_fn

__all__ = ['AFNONet', 'AFNO2dNHWC']

_ARXIV = '2111.13587'


class AFNO2dNHWC(AFNO2d):
    """`AFNO2d` on channels-last maps, ``x + F⁻¹(S_λ(MLP(F(x))))`` on [B, H, W, C] (the released ``AFNO2D``'s layout);
    ``feat_size`` is accepted for `GFNetBlock`'s mixer slot and unused (nothing depends on the size). A class of its
    own so that timm's ``torch.fx`` tracer keeps it a leaf module.

    Shapes:
        x: [B, H, W, C] -> [B, H, W, C], any H and W.
    """

    def __init__(self, channels: int, feat_size: tuple[int, int] | None = None, **kwargs: Any) -> None:
        super().__init__(channels, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-1] != self.channels:
            raise ValueError(f'AFNO2dNHWC: x must be [B, H, W, {self.channels}], got shape {list(x.shape)}')
        return x + afno_2d(x, self.w1, self.b1, self.w2, self.b2, self.sparsity_threshold,
                           self.hard_thresholding_fraction, channels_last=True)


class AFNONet(GFNet):
    """AFNONet (GFNet's isotropic layout with AFNO token mixing), timm's model interface.

    Args:
        img_size: the training resolution; the position embedding is built for its token grid.
        patch_size: side of the patches (the stride; default 4, the released).
        embed_dim: channels C (a multiple of ``num_blocks``).
        depth: number of blocks.
        num_blocks: blocks k of AFNO's block-diagonal weights.
        sparsity_threshold: λ of AFNO's soft threshold.
        hard_thresholding_fraction: fraction of the half-spectrum modes AFNO keeps.
        hidden_size_factor: width factor of AFNO's MLP.
        **kwargs: `GFNet`'s other arguments (``in_chans``, ``num_classes``, ``global_pool``, ``mlp_ratio``,
            ``drop_rate``, ``pos_drop_rate``, ``proj_drop_rate``, ``drop_path_rate``, ``layer_scale``,
            ``norm_layer``, ``device``, ``dtype``).
    """

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            patch_size: int = 4,
            embed_dim: int = 256,
            depth: int = 12,
            num_blocks: int = 4,
            sparsity_threshold: float = 0.01,
            hard_thresholding_fraction: float = 1.0,
            hidden_size_factor: int = 1,
            norm_layer: type[nn.Module] = LayerNorm,
            **kwargs: Any,
    ) -> None:
        afno_kwargs = dict(num_blocks=num_blocks, sparsity_threshold=sparsity_threshold,
                           hard_thresholding_fraction=hard_thresholding_fraction,
                           hidden_size_factor=hidden_size_factor)

        def filter_layer(dim: int, feat_size: tuple[int, int], device=None, dtype=None) -> AFNO2dNHWC:
            return AFNO2dNHWC(dim, feat_size, device=device, dtype=dtype, **afno_kwargs)

        if embed_dim % num_blocks:
            raise ValueError(f'num_blocks must divide embed_dim = {embed_dim}, got {num_blocks}')
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         norm_layer=norm_layer, filter_layer=filter_layer, **kwargs)


_MODELS: dict[str, dict[str, Any]] = {
    'afnonet_ti': dict(patch_size=4, embed_dim=256, depth=12, num_blocks=4, drop_path_rate=0.1),
}

default_cfgs = generate_default_cfgs({
    name: default_cfg(_ARXIV, pool_size=(56, 56), crop_pct=0.9, interpolation='bicubic',
                      first_conv='patch_embed.proj', classifier='head.fc', license='mit')
    for name in _MODELS
})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> AFNONet:
    args = dict(_MODELS[variant], **kwargs)
    out_indices = args.pop('out_indices', _quarter_ends(args['depth']))
    return build_checked(AFNONet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                         feature_cfg=dict(feature_cls='getter', out_indices=out_indices), **args)


for _name in _MODELS:
    make_entrypoint(_name, __name__, _create, f'{_name} ({paper_id(_ARXIV)}); see the docstring of {__name__}.')
