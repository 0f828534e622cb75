"""Triton helpers shared by the kernels of visattn.ops (imported only when a Triton path runs)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_tile(ptr, base, rows, cols, row_mask, d):
    """Tile of the rows ``rows`` (where ``row_mask``) and columns ``cols < d`` of a row-major [*, d] array at
    ``ptr + base``, in the array's dtype (a ``tl.dot`` operand); 0 elsewhere."""
    return tl.load(ptr + base + rows[:, None] * d + cols[None, :], mask=row_mask[:, None] & (cols[None, :] < d),
                   other=0.0)


@triton.jit
def load_rows(ptr, base, rows, cols, row_mask, d):
    """``load_tile`` in float32."""
    return load_tile(ptr, base, rows, cols, row_mask, d).to(tl.float32)


@triton.jit
def store_rows(ptr, base, rows, cols, row_mask, d, value):
    """Store ``value`` (cast to the array's dtype) into the tile that ``load_rows`` reads."""
    tl.store(ptr + base + rows[:, None] * d + cols[None, :], value.to(ptr.dtype.element_ty),
             mask=row_mask[:, None] & (cols[None, :] < d))


@triton.jit
def online_softmax_step(m, s_sum, acc, s, v):
    """Fold one key tile into an online softmax (FlashAttention-2): float32 scores ``s`` [M, N] (-inf where masked)
    and values ``v`` [N, D] into the running maximum ``m`` [M], sum ``s_sum`` [M] and output ``acc`` [M, D]."""
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    p = tl.exp(s - m_safe[:, None])
    return m_new, s_sum * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)


@triton.jit
def online_rowsum_step(m, s_sum, acc, s, x):
    """``online_softmax_step`` for one value per (query, key) pair: fold the float32 scores ``s`` [M, N] (-inf where
    masked) and values ``x`` [M, N] into the running maximum ``m``, sum ``s_sum`` and ``acc = Σ exp(s - m)·x``, all
    [M]. A backward folds dP = dO·Vᵀ into it to get delta = rowsum(P·dP) = acc / s_sum from the same P and dP as
    dS = P·(dP - delta) (where P is one-hot, delta is then dP at that key exactly and dS cancels to 0, as in torch's
    softmax backward), and then takes P = exp(s - m) / s_sum: m and s_sum kept apart rather than folded into a
    log-sum-exp m + log(s_sum), whose float32 rounding at |m| ~ 100 (half an ulp: 4e-6) moves every P of the row."""
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    p = tl.exp(s - m_safe[:, None])
    return m_new, s_sum * alpha + tl.sum(p, 1), acc * alpha + tl.sum(p * x, 1)


@triton.jit
def softmax_finish(acc, m, s_sum):
    """Output ``acc / s_sum`` and log-sum-exp of an online softmax (zeros and +inf for a row with no key)."""
    empty = s_sum == 0.0
    s_sum = tl.where(empty, 1.0, s_sum)
    lse = tl.where(empty, float('inf'), tl.where(m == float('-inf'), 0.0, m) + tl.log(s_sum))
    return acc / s_sum[:, None], lse
