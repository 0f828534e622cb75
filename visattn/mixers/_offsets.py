"""Attention over the keys at a fixed set of offsets from each query (LogSparse, the dilated schedule).

Query i attends to the keys ``i + o`` for the offsets ``o`` of a static list (``o = 0`` is the query itself) that
fall inside the sequence. The keys are read as shifted views of the padded key sequence, one offset at a time, so
nothing of size ``N x |offsets| x D`` is formed: O(N·|offsets|·D) time, O(N·|offsets|) extra memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._utils import masked_softmax_fp32

__all__ = ['offset_attention', 'mirror_offsets']


def mirror_offsets(back: list[int]) -> list[int]:
    """A causal offset list (offsets <= 0) joined with its mirror image: the symmetric (non-causal) pattern."""
    out: list[int] = []
    for o in back:
        if o not in out:
            out.append(o)
        if -o not in out:
            out.append(-o)
    return out


def offset_attention(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        offsets: list[int],
        key_mask: Tensor,
        scale: float,
        dropout_p: float = 0.,
) -> Tensor:
    """Softmax attention of query i over the keys ``i + o``, ``o`` in ``offsets``, inside ``[0, N)`` and not padding.

    The scores and the softmax are computed in at least float32; a query that sees no key outputs zeros.

    Args:
        q, k, v: [B, H, N, D].
        offsets: distinct ints (key position minus query position); offsets with ``|o| >= N`` are ignored.
        key_mask: bool [B, 1, N] or [B, H, N]; False = the key is padding.
        scale: multiplier of ``q·k``.
        dropout_p: dropout probability on the normalised weights, applied when > 0 (pass 0 outside training).

    Returns:
        [B, H, N, D] in v's dtype.
    """
    N = q.shape[-2]
    used: list[int] = []
    for o in offsets:
        if o > -N and o < N:
            used.append(o)
    if len(used) == 0:
        return torch.zeros_like(v)
    lo = max(0, -min(used))
    hi = max(0, max(used))
    dtype = torch.promote_types(q.dtype, torch.float32)
    q = q.to(dtype).contiguous()  # the loops below read q and the shifted keys in step
    kp = F.pad(k.to(dtype), (0, 0, lo, hi))
    vp = F.pad(v.to(dtype), (0, 0, lo, hi))
    mp = F.pad(key_mask.to(torch.bool), (lo, hi), value=0.)  # [B, 1 or H, N + lo + hi]
    scores: list[Tensor] = []
    seen: list[Tensor] = []
    for o in used:
        scores.append((q * kp[:, :, lo + o:lo + o + N]).sum(-1))
        seen.append(mp[:, :, lo + o:lo + o + N])
    p = masked_softmax_fp32(torch.stack(scores, dim=-1).mul(scale), torch.stack(seen, dim=-1))  # [B, H, N, L]
    if dropout_p > 0.:
        p = F.dropout(p, dropout_p, True)
    p = p.movedim(-1, 0).unsqueeze(-1).contiguous()  # [L, B, H, N, 1]: the weights of one offset are contiguous
    out = q.new_zeros(v.shape)
    for t, o in enumerate(used):
        out = out.addcmul_(p[t], vp[:, :, lo + o:lo + o + N])
    return out.to(v.dtype)
