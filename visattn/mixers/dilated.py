"""Dilated attention of "Transformer on a Diet".

Paper: "Transformer on a Diet", Wang, Ye, Zhang, Zhang, Smola, 2020, arXiv:2002.06170
(https://arxiv.org/abs/2002.06170); code: https://github.com/cgraywang/transformer-on-diet.

Layer l of the dilated transformer attends like a causal dilated convolution of kernel size k: query i sees the
``k`` keys ``i, i - d, ..., i - (k - 1)·d`` with the dilation ``d = base^l`` growing with depth (the released
code: ``kernel_size=3``, ``d_base=2``), so that L layers see ``(k - 1)·(base^L - 1)/(base - 1) + 1`` tokens back at
O(N·k) cost per layer. The dilated-memory variant (``memory=True``) keeps the keys of the shallower layers too:
layer l sees the union of the patterns of layers ``0 .. l`` (the released code's ``dilated_mem`` mask, which
accumulates the masks layer by layer). A mixer is one layer: build layer l with ``layer_idx=l``.

The paper is causal (language modelling). Without ``is_causal`` the kernel is made symmetric, ``i + t·d`` for
``|t| <= k - 1`` (an extension for encoders such as a ViT, not in the paper).
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from .._utils import check_int
from ..registry import register
from ._base import TokenMixer
from ._offsets import mirror_offsets, offset_attention
from ._sparse_utils import key_mask_of

__all__ = ['DilatedAttention', 'dilated_offsets']


def dilated_offsets(seq_len: int, kernel_size: int, dilation_base: int, layer_idx: int, memory: bool = False,
                    causal: bool = True) -> list[int]:
    """Offsets (key position minus query position) of layer ``layer_idx``'s dilated pattern inside ``seq_len``
    tokens."""
    back: list[int] = []
    d = 1
    for layer in range(layer_idx + 1):
        if memory or layer == layer_idx:
            for t in range(kernel_size):
                if t * d < max(seq_len, 1) and -t * d not in back:
                    back.append(-t * d)
        if d < seq_len:  # a larger dilation adds no key inside the sequence (and cannot overflow)
            d *= dilation_base
    return back if causal else mirror_offsets(back)


@register(
    'dilated', paper='Transformer on a Diet (dilated transformer)', arxiv='2002.06170', year=2020,
    family='sparse', complexity='O(N·k)', kind='mixer', supports_causal=True,
)
class DilatedAttention(TokenMixer):
    """Attention to the keys at multiples of a dilation ``base^layer_idx``, like a dilated convolution.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`).
        kernel_size: k, keys per query on the causal side, the query included (the released code: 3).
        dilation_base: the dilation of layer l is ``dilation_base ** l`` (the released code: 2).
        layer_idx: l, the depth of this layer (0 = the first layer, dilation 1).
        memory: the dilated-memory variant: also see the keys of the layers ``0 .. l - 1``.
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask``: [B, N] bool key padding (True = real token).
    """

    supports_key_padding = True
    supports_causal = True

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
            kernel_size: int = 3,
            dilation_base: int = 2,
            layer_idx: int = 0,
            memory: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        self.kernel_size = check_int('kernel_size', kernel_size)
        self.dilation_base = check_int('dilation_base', dilation_base)
        self.layer_idx = check_int('layer_idx', layer_idx, 0)
        self.memory = memory

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        offsets = dilated_offsets(
            q.shape[-2], self.kernel_size, self.dilation_base, self.layer_idx, self.memory, is_causal)
        return offset_attention(q, k, v, offsets, key_mask_of(key_padding_mask, q), self.scale,
                                self.attn_drop.p if self.training else 0.)
