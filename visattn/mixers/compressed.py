"""Memory-compressed attention.

Paper: "Generating Wikipedia by Summarizing Long Sequences", Liu, Saleh, Pot, Goodrich, Sepassi, Kaiser,
Shazeer, ICLR 2018, arXiv:1801.10198 (https://arxiv.org/abs/1801.10198).

Keys and values are compressed along the sequence by a strided convolution (the paper: kernel 3, stride 3),
so every query attends to ``N / 3`` memory slots: O(N²/s) time and memory. Causal: query i sees the slots
whose whole window of ``s`` tokens lies at or before i (a query before the first complete window sees nothing
and outputs zeros), so no future token leaks through a slot.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_int
from ..registry import register
from ._base import TokenMixer, softmax_attention
from ._sparse_utils import key_mask_of, pad_to_multiple

__all__ = ['MemoryCompressedAttention']


@register(
    'memory_compressed', paper='Generating Wikipedia by Summarizing Long Sequences', arxiv='1801.10198',
    year=2018, family='compressed', complexity='O(N²/s)', kind='mixer', supports_causal=True,
)
class MemoryCompressedAttention(TokenMixer):
    """Attention over strided-convolution summaries of the keys and values.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`).
        compression: kernel size and stride s of the compressing convolutions (the paper: 3).
        groups: groups of the convolutions (1: every channel mixes, as the paper; ``num_heads``: per head).
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask``: [B, N] bool key padding (True = real token; a slot holding
        only padding is masked, padding inside a slot contributes zeros).
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
            compression: int = 3,
            groups: int = 1,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        self.compression = check_int('compression', compression)
        check_int('groups', groups)
        if dim % groups:
            raise ValueError(f'groups={groups} must divide dim={dim}')
        conv = dict(kernel_size=compression, stride=compression, groups=groups, device=device, dtype=dtype)
        self.compress_k = nn.Conv1d(dim, dim, **conv)
        self.compress_v = nn.Conv1d(dim, dim, **conv)

    def compress(self, x: Tensor, values: bool) -> Tensor:
        """``[B, H, N, D]`` (N a multiple of s) -> ``[B, H, N/s, D]``, by ``compress_v`` if ``values`` else
        ``compress_k`` (a flag, not the module: TorchScript takes no module argument)."""
        B, H, N, D = x.shape
        x = x.transpose(2, 3).reshape(B, H * D, N)
        y = self.compress_v(x) if values else self.compress_k(x)  # [B, C, N/s]
        return y.reshape(B, H, D, y.shape[-1]).transpose(2, 3).contiguous()  # contiguous: SDPA's fused CPU kernel

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        N, s = q.shape[-2], self.compression
        key_mask = pad_to_multiple(key_mask_of(key_padding_mask, q), s, -1, 0.)  # [B, 1, Np], padded with False
        w = key_mask.unsqueeze(-1).to(k.dtype)
        kc = self.compress(pad_to_multiple(k, s, -2) * w, False)
        vc = self.compress(pad_to_multiple(v, s, -2) * w, True)
        slots = key_mask[:, 0].unflatten(-1, (-1, s)).any(-1)  # [B, M]: the slot holds a real token
        causal: Tensor | None = None
        if is_causal:
            last = torch.arange(kc.shape[-2], device=q.device) * s + s - 1
            causal = last[None, :] <= torch.arange(N, device=q.device)[:, None]  # [N, M]
        return softmax_attention(
            q, kc, vc, key_padding_mask=None if key_padding_mask is None else slots, attn_mask=causal,
            dropout_p=self.attn_drop.p if self.training else 0., scale=self.scale)
