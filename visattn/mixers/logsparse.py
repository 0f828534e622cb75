"""LogSparse attention.

Paper: "Enhancing the Locality and Breaking the Memory Bottleneck of Transformer on Time Series Forecasting",
Li, Jin, Xuan, Zhou, Chen, Wang, Yan, NeurIPS 2019, arXiv:1907.00235 (https://arxiv.org/abs/1907.00235).

Each cell attends to itself and to the earlier cells at exponentially growing distances (the paper's
``I_l = {l - 2^⌊log2 l⌋, ..., l - 4, l - 2, l - 1, l}``): query i sees keys ``i - 2^m`` for every ``m >= 0`` with
``2^m <= i``, O(log N) keys per query and O(N·log N) in all; stacking O(log N) layers connects every pair. The
paper's local-attention variant lets each cell densely see the ``w`` cells before it and resumes the exponential
steps beyond that window: distances ``1 .. w`` and ``w + 2^m`` (``local_window=w``; 0 = plain LogSparse).

The paper is causal (forecasting). Without ``is_causal`` the pattern is made symmetric: the distances above on
both sides of the query (an extension for encoders such as a ViT, not in the paper). The paper's other
contributions (convolutional query/key projections, restart attention) are not part of this mixer.
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from .._utils import check_int
from ..registry import register
from ._base import TokenMixer
from ._offsets import mirror_offsets, offset_attention
from ._sparse_utils import key_mask_of

__all__ = ['LogSparseAttention', 'logsparse_offsets']


def logsparse_offsets(seq_len: int, local_window: int = 0, causal: bool = True) -> list[int]:
    """Offsets (key position minus query position) of the LogSparse pattern for ``seq_len`` tokens.

    Causal: ``0``, ``-1 .. -w`` and ``-(w + 2^m)`` for ``w + 2^m < seq_len``; otherwise the same with their mirror.
    """
    back: list[int] = [0]
    for d in range(1, min(local_window, seq_len - 1) + 1):
        back.append(-d)
    step = 1
    while local_window + step < seq_len:
        back.append(-(local_window + step))
        step *= 2
    return back if causal else mirror_offsets(back)


@register(
    'logsparse', paper='Enhancing the Locality and Breaking the Memory Bottleneck of Transformer on Time Series '
    'Forecasting (LogSparse)', arxiv='1907.00235', year=2019, family='sparse', complexity='O(N·log N)',
    kind='mixer', supports_causal=True,
)
class LogSparseAttention(TokenMixer):
    """Attention to the keys at exponentially spaced distances (and an optional dense local window).

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`).
        local_window: w, the cells before the query that it sees densely (the paper's local attention, of size
            O(log N) there); the exponential steps start after them. 0 (default) = plain LogSparse.
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
            local_window: int = 0,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        self.local_window = check_int('local_window', local_window, 0)

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        offsets = logsparse_offsets(q.shape[-2], self.local_window, is_causal)
        return offset_attention(q, k, v, offsets, key_mask_of(key_padding_mask, q), self.scale,
                                self.attn_drop.p if self.training else 0.)
