"""Self-attention with persistent memory vectors (the all-attention layer's attention).

Paper: "Augmenting Self-attention with Persistent Memory", Sukhbaatar, Grave, Lample, Jégou, Joulin, 2019,
arXiv:1907.01470 (https://arxiv.org/abs/1907.01470); released code: facebookresearch/adaptive-span
(``persistent_memory.py``).

Every head h gets S learned key/value slots, input-independent and shared by all positions, concatenated to the
keys and values of the tokens; one softmax runs over both (the paper's persistent-memory attention, without its
relative position terms, which are not part of a ViT mixer):

    [k_1 .. k_N, M_k,h]  and  [v_1 .. v_N, M_v,h],   M_k,h, M_v,h [S, D]
    y_i = Σ_j softmax_j(q_i · k_j / √D) v_j  over the N tokens and the S slots, then ``proj``.

The slots play the role of the feed-forward layer (the paper removes it; in a timm ViT the block keeps its MLP).
Scaling, as in the released code: the slots are stored as ``mem_k`` ~ N(0, 1/D) and ``mem_v`` ~ N(0, 1/S) and
used multiplied by √D and √S, so that the effective keys and values start with unit variance while the stored
parameters, and their gradient steps, stay of the size of the projected tokens'. (``mem_k`` is [H, S, D]; the
code's ``key`` is its transpose [H, D, S].) ``qk_norm`` normalises the token keys only; the slots are free.

Masks: the slots are never masked. They are always visible, under key padding, under any dense ``attn_mask``
and under ``is_causal=True`` (they carry no position and no information from any token, so seeing them breaks
no causality). The project's rule "a row that sees no key gives zeros" therefore never applies: a row whose
token keys are all hidden still sees the S slots and attends over them alone, which is what the mechanism
defines (the slots stand for the feed-forward layer, which acts at every position whatever the mask) and
keeps the output continuous in the mask: a row that sees one token weights it against the same slots.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_int
from ..registry import register
from ._base import TokenMixer, combine_masks, softmax_attention

__all__ = ['PersistentMemoryAttention']


def with_slots(mask: Tensor, slots: int) -> Tensor:
    """A mask over the N token keys (SDPA's convention, ``[..., N]``) extended by ``slots`` always-visible keys."""
    shape = list(mask.shape[:-1]) + [slots]
    if mask.dtype == torch.bool:
        extra = torch.ones(shape, dtype=torch.bool, device=mask.device)
    else:
        extra = torch.zeros(shape, dtype=mask.dtype, device=mask.device)
    return torch.cat([mask, extra], dim=-1)


@register(
    'persistent', paper='Augmenting Self-attention with Persistent Memory', arxiv='1907.01470', year=2019,
    family='memory', complexity='O(N·(N+S)·C)', kind='mixer', supports_causal=True,
)
class PersistentMemoryAttention(TokenMixer):
    """Multi-head softmax attention over the tokens and S persistent key/value slots per head.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`; its state dict loads, the slots start fresh).
        num_slots: S, persistent vectors per head (default 64, ours: the paper uses N = 1024 to 2048 where the
            slots replace the feed-forward layer; a ViT block keeps its MLP).
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask`` [B, N] bool (True = real token) or broadcastable to [B, H, N, N]
        (SDPA's convention); it masks token keys only.

    Parameters beyond timm's ``Attention``: ``mem_k``, ``mem_v`` [H, S, D].
    """

    supports_key_padding = True
    supports_dense_mask = True
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
            num_slots: int = 64,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        dd = dict(device=device, dtype=dtype)
        self.num_slots = check_int('num_slots', num_slots)
        self.key_gain = self.head_dim ** 0.5
        self.value_gain = num_slots ** 0.5
        self.mem_k = nn.Parameter(torch.empty(num_heads, num_slots, self.head_dim, **dd))
        self.mem_v = nn.Parameter(torch.empty(num_heads, num_slots, self.head_dim, **dd))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``mem_k`` ~ N(0, 1/D), ``mem_v`` ~ N(0, 1/S), as the released code."""
        if self.mem_k.device.type != 'meta':
            nn.init.normal_(self.mem_k, std=self.head_dim ** -0.5)
            nn.init.normal_(self.mem_v, std=self.num_slots ** -0.5)

    def slots(self, batch: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The effective slot keys and values, ``√D · mem_k`` and ``√S · mem_v``, each [batch, H, S, D]."""
        mk = (self.mem_k * self.key_gain).to(dtype).unsqueeze(0)
        mv = (self.mem_v * self.value_gain).to(dtype).unsqueeze(0)
        shape = [batch, self.num_heads, self.num_slots, self.head_dim]
        return mk.expand(shape), mv.expand(shape)

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        mk, mv = self.slots(q.shape[0], k.dtype)
        k, v = torch.cat([k, mk], dim=2), torch.cat([v, mv], dim=2)  # [B, H, N + S, D]
        mask = combine_masks(key_padding_mask, attn_mask, is_causal, q.shape[2], q.device)
        if mask is not None:
            mask = with_slots(mask, self.num_slots)
        p = self.attn_drop.p if self.training else 0.
        return softmax_attention(q, k, v, None, mask, False, dropout_p=p, scale=self.scale)
