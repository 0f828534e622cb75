"""PyTorch path of 1-D sliding-window attention: the spec, and the memory-efficient CPU path.

Query i attends to the keys ``j = i + dilation·t`` with ``t ∈ [-(window//2), window//2]`` (``window`` odd), or
``t ∈ [-(window-1), 0]`` when causal; keys outside ``[0, N)`` are left out. Queries are processed in blocks of
``block`` against the band of keys their windows cover (``block + span - 1`` keys, ``span`` the reach of a
window), as one batched product: memory O(N·(block + span)), never N×N, and no Python loop over positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._utils import masked_softmax_fp32
from .._dispatch import upcast


def window_offsets(window: int, dilation: int, causal: bool) -> tuple[int, int]:
    """The lowest and highest relative key position ``j - i`` of a window."""
    if causal:
        return -(window - 1) * dilation, 0
    return -(window // 2) * dilation, (window // 2) * dilation


def local_attention_1d_naive(q: Tensor, k: Tensor, v: Tensor, window: int, dilation: int = 1, causal: bool = False,
                             scale: float | None = None, block: int | None = None) -> Tensor:
    """Sliding-window softmax attention (see the module docstring for the window).

    Args:
        q, k: [B, H, N, Dk].
        v: [B, H, N, Dv].
        window: keys per query (odd unless causal).
        dilation: step between the keys of a window.
        causal: the window ends at the query.
        scale: factor on q·k (default 1/sqrt(Dk)).
        block: queries per block; default 32 for windows that reach at most 32 positions, else 64 (the fastest on
            a CPU at N = 4096, D = 64).

    Returns:
        [B, H, N, Dv] in ``q``'s dtype (float32 accumulation).
    """
    b, h, n, dk = q.shape
    scale = dk ** -0.5 if scale is None else scale
    lo, hi = window_offsets(window, dilation, causal)
    span = hi - lo + 1
    if block is None or block == 0:
        block = 32 if span <= 32 else 64
    block = min(block, n)
    nb = -(-n // block)
    kw = block + span - 1  # keys in the band of one query block
    qf = F.pad(upcast(q) * scale, (0, 0, 0, nb * block - n)).unflatten(2, (nb, block))  # [B, H, nb, block, Dk]
    pad = (0, 0, -lo, nb * block - n + hi)
    kb = F.pad(upcast(k), pad).unfold(2, kw, block)  # [B, H, nb, Dk, kw]
    vb = F.pad(upcast(v), pad).unfold(2, kw, block)  # [B, H, nb, Dv, kw]
    i = torch.arange(nb * block, device=q.device).view(nb, block, 1)
    j = torch.arange(nb, device=q.device).view(nb, 1, 1) * block + torch.arange(kw, device=q.device) + lo
    rel = j - i  # [nb, block, kw]
    mask = (rel >= lo) & (rel <= hi) & (rel % dilation == 0) & (j >= 0) & (j < n)
    p = masked_softmax_fp32(torch.einsum('bhcqd,bhcdk->bhcqk', qf, kb), mask)
    out = torch.einsum('bhcqk,bhcdk->bhcqd', p, vb).flatten(2, 3)[:, :, :n]
    return out.to(q.dtype)
