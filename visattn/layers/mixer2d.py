"""Any 1-D token mixer as a 2-D block: flatten NCHW to tokens, add a 2-D position encoding, mix, reshape back.

The tokens are the H·W positions of the feature map, as in "An Image is Worth 16x16 Words: Transformers for
Image Recognition at Scale", Dosovitskiy et al., ICLR 2021, arXiv:2010.11929 (with 1×1 patches). The block is
a pre-norm residual attention layer, ``y = x + mixer(LN(tokens) + P)``, where P is the fixed 2-D sine-cosine
encoding of MoCo v3 / MAE ("An Empirical Study of Training Self-Supervised Vision Transformers", Chen, Xie, He,
arXiv:2104.02057): a quarter of the channels encode ``sin(y·ω_i)``, a quarter ``cos(y·ω_i)``, then the same
for x, with ``ω_i = 10000^(-i / (C/4))``; leftover channels (C not divisible by 4) get 0. It has no
parameters and needs no ``seq_len``, so any H and W work (mixers built with ``seq_len`` need ``H·W <= seq_len``).

``visattn.create_attn('mixer:performer', channels)`` builds this block around the ``performer`` mixer;
``visattn.get_attn('mixer:<name>')`` is the matching class, usable as timm's ``attn_layer=``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import bind_defaults, check_channels, check_int, check_nchw
from ..registry import get_mixer, info, register

__all__ = ['MixerAttn2d', 'sincos_2d']


def sincos_2d(height: int, width: int, channels: int, *, temperature: float = 10000., device=None,
              dtype=None) -> Tensor:
    """Fixed 2-D sine-cosine position encoding: [height · width, channels], row-major positions."""
    quarter = channels // 4
    omega = temperature ** (-torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter, 1))
    y, x = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                          torch.arange(width, device=device, dtype=torch.float32), indexing='ij')
    y, x = y.reshape(-1, 1) * omega, x.reshape(-1, 1) * omega  # [H·W, C/4]
    pe = torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)
    return nn.functional.pad(pe, (0, channels - 4 * quarter)).to(dtype)


@register(
    'mixer', paper='An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale',
    arxiv='2010.11929', year=2020, family='mixer-adapter', complexity="the mixer's, with N = H·W",
)
class MixerAttn2d(nn.Module):
    """A token mixer applied to the H·W positions of a feature map, as a residual 2-D block.

    Args:
        channels: input and output channels C (the mixer's ``dim``).
        mixer: name of a registered token mixer (default ``'full'``).
        num_heads: the mixer's heads (default: the largest of 8, 4, 2, 1 that divides C).
        pos_embed: add the 2-D sine-cosine encoding (default True).
        norm: LayerNorm on the tokens before the encoding and the mixer (default True).
        feat_size: (H, W) of the input, needed only by mixers that take ``seq_len`` (``seq_len = H·W`` unless
            given in ``mixer_kwargs``).
        device, dtype: factory arguments.
        **mixer_kwargs: the mixer's own arguments (e.g. ``nb_features=64`` for ``performer``).

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
            self,
            channels: int,
            *,
            mixer: str = 'full',
            num_heads: int | None = None,
            pos_embed: bool = True,
            norm: bool = True,
            feat_size: tuple[int, int] | None = None,
            device=None,
            dtype=None,
            **mixer_kwargs,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        mixer_cls = get_mixer(mixer)
        num_heads = math.gcd(channels, 8) if num_heads is None else check_int('num_heads', num_heads)
        if isinstance(mixer, str) and info(f'mixer:{mixer}').requires_seq_len and 'seq_len' not in mixer_kwargs:
            if feat_size is None:
                raise ValueError(f'mixer {mixer!r} needs a fixed length: give feat_size=(H, W) or seq_len=')
            mixer_kwargs['seq_len'] = int(feat_size[0]) * int(feat_size[1])
        self.mixer_name = mixer if isinstance(mixer, str) else mixer_cls.__name__
        self.pos_embed = pos_embed
        self.norm = nn.LayerNorm(channels, **dd) if norm else nn.Identity()
        self.mixer = mixer_cls(channels, num_heads=num_heads, **mixer_kwargs, **dd)

    @classmethod
    def for_mixer(cls, mixer: str) -> type[MixerAttn2d]:
        """The subclass whose ``mixer`` defaults to ``mixer`` (what ``get_attn('mixer:<name>')`` returns)."""
        get_mixer(mixer)  # an unknown name raises the registry's error here
        return bind_defaults(cls, ''.join(p.title() for p in mixer.lower().split('_')), mixer=mixer.lower())

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'MixerAttn2d')
        B, C, H, W = x.shape
        t = self.norm(x.flatten(2).transpose(1, 2))  # [B, H·W, C]
        if self.pos_embed:
            t = t + sincos_2d(H, W, C, device=x.device, dtype=t.dtype)
        return x + self.mixer(t).transpose(1, 2).reshape(B, C, H, W)
