"""Triton helpers shared by the kernels of visattn.ops (imported only when a Triton path runs)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_rows(ptr, base, rows, cols, row_mask, d):
    """Float32 tile of the rows ``rows`` (where ``row_mask``) and columns ``cols < d`` of a row-major [*, d] array
    at ``ptr + base``; 0 elsewhere."""
    return tl.load(ptr + base + rows[:, None] * d + cols[None, :], mask=row_mask[:, None] & (cols[None, :] < d),
                   other=0.0).to(tl.float32)


@triton.jit
def store_rows(ptr, base, rows, cols, row_mask, d, value):
    """Store ``value`` (cast to the array's dtype) into the tile that ``load_rows`` reads."""
    tl.store(ptr + base + rows[:, None] * d + cols[None, :], value.to(ptr.dtype.element_ty),
             mask=row_mask[:, None] & (cols[None, :] < d))


@triton.jit
def softmax_finish(acc, m, s_sum):
    """Output ``acc / s_sum`` and log-sum-exp of an online softmax (zeros and +inf for a row with no key)."""
    empty = s_sum == 0.0
    s_sum = tl.where(empty, 1.0, s_sum)
    lse = tl.where(empty, float('inf'), tl.where(m == float('-inf'), 0.0, m) + tl.log(s_sum))
    return acc / s_sum[:, None], lse
