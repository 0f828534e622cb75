"""Attention over the keys at a fixed set of offsets from each query (LogSparse, the dilated schedule).

Query i attends to the keys ``i + o`` for the offsets ``o`` of a static list (``o = 0`` is the query itself) that
fall inside the sequence. The keys are read as shifted views of the padded key sequence, one offset at a time, so
nothing of size ``N x |offsets| x D`` is formed: O(N·|offsets|·D) time, O(N·|offsets|) extra memory. Without
autograd the queries go in chunks that stay in cache. With autograd (and no attention dropout) a
``torch.autograd.Function`` computes the gradients with the same shifted loops, accumulating into the padded key and
value gradients in place: autograd through the loops would give every slice of the padded keys a gradient of their
full size. When scripted (TorchScript compiles no ``autograd.Function``) or with dropout, autograd runs through the
loops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._utils import masked_softmax_fp32, needs_grad

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


def _weights_and_mix(
        q: Tensor, kp: Tensor, vp: Tensor, mp: Tensor, used: list[int], lo: int, scale: float, step: int,
        dropout_p: float,
) -> tuple[Tensor, Tensor]:
    """``(out [B, H, N, D], weights [L, B, H, N, 1])`` over query chunks of ``step`` (padded inputs, see below)."""
    N = q.shape[-2]
    outs: list[Tensor] = []
    weights: list[Tensor] = []
    for i in range(0, N, step):
        c = min(step, N - i)
        qc = q[:, :, i:i + c]
        scores: list[Tensor] = []
        seen: list[Tensor] = []
        for o in used:
            scores.append((qc * kp[:, :, lo + o + i:lo + o + i + c]).sum(-1))
            seen.append(mp[:, :, lo + o + i:lo + o + i + c])
        p = masked_softmax_fp32(torch.stack(scores, dim=-1).mul(scale), torch.stack(seen, dim=-1))  # [B, H, c, L]
        if dropout_p > 0.:
            p = F.dropout(p, dropout_p, True)
        p = p.movedim(-1, 0).unsqueeze(-1).contiguous()  # [L, B, H, c, 1]: the weights of one offset are contiguous
        out = q.new_zeros([vp.shape[0], vp.shape[1], c, vp.shape[3]])
        for t, o in enumerate(used):
            out = out.addcmul_(p[t], vp[:, :, lo + o + i:lo + o + i + c])
        outs.append(out)
        weights.append(p)
    if len(outs) == 1:
        return outs[0], weights[0]
    return torch.cat(outs, dim=2), torch.cat(weights, dim=3)


def _chunk(q: Tensor) -> int:
    """Queries per chunk when no gradient is recorded: about 256K values of q per chunk."""
    return max(64, (1 << 18) // max(1, q.shape[0] * q.shape[1] * q.shape[3]))


class _OffsetAttention(torch.autograd.Function):
    """`offset_attention` on padded keys and values, with a backward that accumulates in place."""

    @staticmethod
    def forward(ctx, q: Tensor, kp: Tensor, vp: Tensor, mp: Tensor, used: list[int], lo: int, scale: float) -> Tensor:
        out, p = _weights_and_mix(q, kp, vp, mp, used, lo, scale, _chunk(q), 0.)
        ctx.save_for_backward(q, kp, vp, p)
        ctx.used, ctx.lo, ctx.scale = used, lo, scale
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, kp, vp, p = ctx.saved_tensors
        used, lo, N = ctx.used, ctx.lo, q.shape[-2]
        grad = grad.contiguous()
        dp = torch.stack([(grad * vp[:, :, lo + o:lo + o + N]).sum(-1, keepdim=True) for o in used])  # [L, B, H, N, 1]
        ds = p * (dp - (p * dp).sum(0, keepdim=True)) * ctx.scale  # softmax backward; 0 where masked (p = 0)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(kp), torch.zeros_like(vp)
        for t, o in enumerate(used):
            dq.addcmul_(ds[t], kp[:, :, lo + o:lo + o + N])
            dk[:, :, lo + o:lo + o + N].addcmul_(ds[t], q)
            dv[:, :, lo + o:lo + o + N].addcmul_(p[t], grad)
        return dq, dk, dv, None, None, None, None


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
    q = q.to(dtype).contiguous()  # the loops read q and the shifted keys in step
    kp = F.pad(k.to(dtype), (0, 0, lo, hi))
    vp = F.pad(v.to(dtype), (0, 0, lo, hi))
    mp = F.pad(key_mask.to(torch.bool), (lo, hi), value=0.)  # [B, 1 or H, N + lo + hi]
    grad = needs_grad([q, kp, vp])
    if not torch.jit.is_scripting():
        if grad and dropout_p == 0.:
            return _OffsetAttention.apply(q, kp, vp, mp, used, lo, scale).to(v.dtype)
    out, _ = _weights_and_mix(q, kp, vp, mp, used, lo, scale, N if grad else _chunk(q), dropout_p)
    return out.to(v.dtype)
