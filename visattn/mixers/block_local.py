"""Blocked local attention: non-overlapping blocks, each attending within itself.

Papers:
    - "Generating Wikipedia by Summarizing Long Sequences", Liu, Saleh, Pot, Goodrich, Sepassi, Kaiser, Shazeer,
      ICLR 2018, arXiv:1801.10198 (https://arxiv.org/abs/1801.10198): "local attention", the sequence is divided
      into blocks (of 256 tokens there) and attention runs in each block independently, masked causally in the
      decoder.
    - "Simple Local Attentions Remain Competitive for Long-Context Tasks", Xiong, Oğuz, Gupta, Chen, Liskovich,
      Levy, Yih, Mehdad, NAACL 2022, arXiv:2112.07210 (https://arxiv.org/abs/2112.07210): disjoint blockwise local
      attention matches overlapping windows downstream.

Query i in block ``c = i // b`` attends to the keys of block c (``j <= i`` too when causal): O(N·b). The last block
is shorter when b does not divide N (its missing keys are masked, not attended). For the overlapping forms see
``local`` (a sliding window) and ``bigbird`` with no random or global blocks (a block with its neighbours).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_int
from ..registry import register
from ._base import TokenMixer
from ._sparse_utils import attention_lse, key_mask_of, pad_to_multiple

__all__ = ['BlockLocalAttention', 'block_attention']


def block_attention(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        block_size: int,
        shifts: list[int] | None,
        key_padding_mask: Tensor | None,
        causal: bool,
        scale: float,
        dropout_p: float = 0.,
) -> Tensor:
    """Query block c attends to key block ``(c + shift_h) mod nb`` of its head h (all shifts 0: its own block).

    Args:
        q, k, v: [B, H, N, D].
        block_size: b, tokens per block (the last block holds ``N - (nb - 1)·b``).
        shifts: per head, the cyclic block shift (None: 0 for every head).
        key_padding_mask: [B, N] bool, True = a real key (None: every key).
        causal: query i sees only keys j <= i.
        scale: multiplier of ``q·k``.
        dropout_p: dropout on the attention weights (pass 0 outside training).

    Returns:
        [B, H, N, D]; a query that sees no key outputs zeros.
    """
    B, H, N, D = q.shape
    b = max(1, min(block_size, N))
    nb = -(-N // b)
    qb = pad_to_multiple(q, b, -2).unflatten(-2, (nb, b))  # [B, H, nb, b, D]
    kb = pad_to_multiple(k, b, -2).unflatten(-2, (nb, b))
    vb = pad_to_multiple(v, b, -2).unflatten(-2, (nb, b))
    shifted = False
    if shifts is not None:
        for s in shifts:
            if s % nb != 0:
                shifted = True
    pos = torch.arange(nb * b, device=q.device).view(nb, b)
    key_ok = pad_to_multiple(key_mask_of(key_padding_mask, q), b, -1, 0.).unflatten(-1, (nb, b))  # [B, 1, nb, b]
    key_pos = pos.expand(1, nb, b)  # [H or 1, nb, b]: the position of every key of the block seen by block c
    if shifted and shifts is not None:
        kbs: list[Tensor] = []
        vbs: list[Tensor] = []
        oks: list[Tensor] = []
        poss: list[Tensor] = []
        for h in range(H):
            s = shifts[h] % nb
            kbs.append(kb[:, h].roll(-s, dims=1))  # block c of the rolled tensor is block (c + s) mod nb
            vbs.append(vb[:, h].roll(-s, dims=1))
            oks.append(key_ok[:, 0].roll(-s, dims=1))
            poss.append(pos.roll(-s, dims=0))
        kb, vb = torch.stack(kbs, 1), torch.stack(vbs, 1)
        key_ok, key_pos = torch.stack(oks, 1), torch.stack(poss, 0)
    if key_padding_mask is None and N % b == 0 and not (causal and shifted):  # nothing to mask but the causal
        out = F.scaled_dot_product_attention(  # triangle of the own block: one SDPA call (flash on a GPU)
            qb.flatten(1, 2), kb.flatten(1, 2), vb.flatten(1, 2), dropout_p=dropout_p, is_causal=causal, scale=scale)
        return out.view(B, H, N, D)
    mask = (key_ok & (key_pos < N)).unsqueeze(-2)  # [B, H or 1, nb, 1, b]
    if causal:
        mask = mask & (key_pos.unsqueeze(-2) <= pos.unsqueeze(-1))  # [H or 1, nb, b, b]
    out = attention_lse(qb, kb, vb, mask, scale=scale, dropout_p=dropout_p)[0]
    return out.flatten(2, 3)[:, :, :N]


@register(
    'block_local', paper='Generating Wikipedia by Summarizing Long Sequences (local attention in blocks)',
    arxiv='1801.10198', year=2018, family='sparse', complexity='O(N·b)', kind='mixer', supports_causal=True,
)
class BlockLocalAttention(TokenMixer):
    """Attention inside non-overlapping blocks of ``block_size`` tokens (causal inside the block when causal).

    Without a padding mask and when ``block_size`` divides N the blocks go to one
    ``scaled_dot_product_attention`` call; otherwise the padded keys and the missing tail of the last block are
    masked.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`).
        block_size: b, tokens per block (1801.10198: 256).
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
            block_size: int = 256,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        self.block_size = check_int('block_size', block_size)

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        return block_attention(q, k, v, self.block_size, None, key_padding_mask, is_causal, self.scale,
                               self.attn_drop.p if self.training else 0.)
