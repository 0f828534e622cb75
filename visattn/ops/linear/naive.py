"""PyTorch path of linear attention: the spec, and the memory-efficient CPU path.

``out_i = φ(q_i)·S / (φ(q_i)·z + eps)`` with ``S = Σ_j φ(k_j) v_jᵀ`` and ``z = Σ_j φ(k_j)`` (``j <= i`` when
causal). ``q`` and ``k`` arrive with φ already applied. Non-causal: one pass (state, then q·state). Causal:
chunked, the masked product inside each chunk plus the state of the chunks before it (an exclusive cumulative sum
of the chunk states), so that nothing N×N is formed. Accumulates in float32 and returns the inputs' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._dispatch import upcast

CHUNK = 64


def linear_attention_naive(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, eps: float = 1e-6,
                           chunk: int = CHUNK) -> Tensor:
    """Linear attention on feature-mapped ``q``, ``k``.

    Args:
        q, k: [B, H, N, Dk], non-negative features φ(q), φ(k).
        v: [B, H, N, Dv].
        causal: query i sees keys j <= i only.
        eps: added to the normaliser (> 0; `linear_attention` checks it).
        chunk: chunk length of the causal path.

    Returns:
        [B, H, N, Dv] in ``q``'s dtype.
    """
    dtype = q.dtype
    q, k, v = upcast(q), upcast(k), upcast(v)
    if not causal:
        state = torch.einsum('bhnk,bhnv->bhkv', k, v)
        num = torch.einsum('bhnk,bhkv->bhnv', q, state)
        den = torch.einsum('bhnk,bhk->bhn', q, k.sum(2))
        return (num / (den.unsqueeze(-1) + eps)).to(dtype)
    n = q.shape[2]
    pad = (-n) % chunk
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    # [B, H, N, D] -> [B, H, C, L, D]: C chunks of length L
    q, k, v = (t.unflatten(2, (-1, chunk)) for t in (q, k, v))
    v1 = torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], dim=-1)  # the normaliser rides as a last column of ones
    states = torch.einsum('bhclk,bhclv->bhckv', k, v1)
    # exclusive: the state of the chunks before each chunk, as a shift of the inclusive sum (not ``cumsum - x``,
    # whose rounding would let a later chunk move an earlier output)
    states = F.pad(states.cumsum(2)[:, :, :-1], (0, 0, 0, 0, 1, 0))
    mask = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    scores = torch.einsum('bhcik,bhcjk->bhcij', q, k).masked_fill(~mask, 0)
    out = torch.einsum('bhcij,bhcjv->bhciv', scores, v1) + torch.einsum('bhcik,bhckv->bhciv', q, states)
    out = out.flatten(2, 3)[:, :, :n]
    return (out[..., :-1] / (out[..., -1:] + eps)).to(dtype)
