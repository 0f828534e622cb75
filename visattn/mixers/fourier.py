"""FNet: token mixing by the Fourier transform, with no parameters.

Paper: "FNet: Mixing Tokens with Fourier Transforms", Lee-Thorp, Ainslie, Eckstein, Ontañón, NAACL 2022,
arXiv:2105.03824.

``y = Re(FFT_seq(FFT_hidden(x)))``: a 2-D discrete Fourier transform over the tokens and the channels, of
which the real part is kept. FNet's mixing sublayer has no projections, so this mixer has no parameters and
ignores timm's ``qkv_bias`` / ``proj_bias`` / dropout arguments. It mixes every token with every other and so
cannot honour a causal or padding mask (it raises ``ValueError``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ..registry import register
from ._base import TokenMixer

__all__ = ['FNetMixer', 'fourier_mix']


@register(
    'fnet', paper='FNet: Mixing Tokens with Fourier Transforms', arxiv='2105.03824', year=2021, family='fourier',
    complexity='O(N·C·log(N·C))', kind='mixer',
)
class FNetMixer(TokenMixer):
    """FNet's Fourier mixing sublayer ``Re(FFT2(x))`` over tokens and channels (in float32 or wider).

    Args:
        dim, num_heads, ...: accepted for timm's attention factory; ``dim``, ``num_heads`` and the dropout rates are
            checked, all but ``dim`` are unused.

    Shapes:
        x: [B, N, C] -> [B, N, C].
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            scale_norm: bool = False,
            proj_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            norm_layer: type[nn.Module] | None = None,
            *,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, False, False, False, False, attn_drop, proj_drop, None, use_qkv=False, use_proj=False,
            device=device,
            dtype=dtype)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        self.check_input(x, attn_mask, is_causal)
        return fourier_mix(x)


@torch.fx.wrap
def fourier_mix(x: Tensor) -> Tensor:
    """``Re(FFT2(x))`` over the last two dims of ``x`` [B, N, C], in at least float32, returned in x's dtype.

    An empty ``x`` (a batch of 0) is returned as a copy (it holds no element): the CPU FFT library refuses empty
    transforms. The shape test is why `torch.fx` keeps this function as one leaf call.
    """
    if x.numel() == 0:
        return x.clone()
    return torch.fft.fft2(x.to(torch.promote_types(x.dtype, torch.float32)), dim=(-2, -1)).real.to(x.dtype)
