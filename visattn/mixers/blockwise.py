"""BlockBERT blockwise self-attention.

Paper: "Blockwise Self-Attention for Long Document Understanding", Qiu, Ma, Levy, Yih, Wang, Tang, Findings of
EMNLP 2020, arXiv:1911.02972 (https://arxiv.org/abs/1911.02972).

The sequence is split into n blocks. A head with the block permutation π attends from query block c to the key
block π(c) only: ``Attention(Q, K, V, M) = [softmax(Q_c K_π(c)ᵀ / sqrt(d)) V_π(c)]_c``, with the masking matrix
``M_cj = 1 iff π(c) = j``. The paper uses the cyclic shifts ``π(c) = (c + s) mod n`` and gives most heads the
identity (short-range heads) and a few each shift (long-range heads): 10:2 for n = 2 and 8:2:2 for n = 3 of 12
heads, the settings it pre-trains (ablated against other ratios there). Here every non-zero shift gets
``H // 6`` heads (at least one) and the identity the rest, in the order identity first, which gives exactly those
splits for 12 heads; ``shifts=`` sets the shift of every head.

The paper fixes n (2 or 3: O(N²/n) time and memory); ``block_size=`` instead fixes the block length, so that the
number of blocks grows with N and the cost is O(N·b) (then the default shifts are those of n = 2: 0 and 1).
Causal: a query sees only the keys at or before it; with a forward shift a block's key block lies in its future and
its queries see nothing (they output zeros) - exact, though such heads are useless in a causal model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from torch import Tensor

from .._utils import check_int
from ..registry import register
from ._base import TokenMixer
from .block_local import block_attention

__all__ = ['BlockwiseAttention', 'default_shifts']


def default_shifts(num_heads: int, num_blocks: int) -> list[int]:
    """The paper's head assignment: each shift ``1 .. n - 1`` gets ``H // 6`` heads (at least one, as long as one
    head is left for the identity), the identity the others; identity heads first."""
    shifts: list[int] = []
    for s in range(1, num_blocks):
        for _ in range(max(1, num_heads // 6)):
            if len(shifts) < num_heads - 1:
                shifts.append(s)
    return [0] * (num_heads - len(shifts)) + shifts


@register(
    'blockwise', paper='Blockwise Self-Attention for Long Document Understanding (BlockBERT)', arxiv='1911.02972',
    year=2019, family='sparse', complexity='O(N²/n)', kind='mixer', supports_causal=True,
)
class BlockwiseAttention(TokenMixer):
    """Each head attends from block c to block ``(c + shift) mod n``.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`).
        num_blocks: n, the number of blocks (the paper: 2 or 3; default 2 when ``block_size`` is not given). The
            blocks hold ``ceil(N / n)`` tokens, the last one the rest.
        block_size: tokens per block instead of a fixed n (O(N·b)); give ``num_blocks`` or ``block_size``.
        shifts: the cyclic block shift of every head (``num_heads`` ints; taken mod the number of blocks); default:
            the paper's assignment (see `default_shifts`).
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
            num_blocks: int | None = None,
            block_size: int | None = None,
            shifts: Sequence[int] | None = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        if num_blocks is not None:
            check_int('num_blocks', num_blocks)
        if block_size is not None:
            check_int('block_size', block_size)
        if num_blocks is not None and block_size is not None:
            raise ValueError(f'give num_blocks or block_size, not both (got num_blocks={num_blocks}, '
                             f'block_size={block_size})')
        self.num_blocks = 2 if num_blocks is None and block_size is None else num_blocks
        self.block_size = block_size
        self._block = 0 if block_size is None else block_size  # ints for TorchScript: 0 = not set
        self._blocks = 0 if self.num_blocks is None else self.num_blocks
        if shifts is None:
            self.shifts = default_shifts(num_heads, 2 if self.num_blocks is None else self.num_blocks)
        else:
            if isinstance(shifts, int) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shifts):
                raise TypeError(f'shifts must be a sequence of ints, got {shifts!r}')
            if len(shifts) != num_heads:
                raise ValueError(f'shifts must give one shift per head ({num_heads}), got {len(shifts)}: {shifts!r}')
            self.shifts = [int(s) for s in shifts]

    def block_size_for(self, seq_len: int) -> int:
        """Tokens per block for a sequence of ``seq_len`` tokens."""
        if self._block > 0:
            return self._block
        return max(1, -(-seq_len // self._blocks))

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        return block_attention(q, k, v, self.block_size_for(q.shape[-2]), self.shifts, key_padding_mask, is_causal,
                               self.scale, self.attn_drop.p if self.training else 0.)
