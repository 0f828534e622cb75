"""Triton path of ``criss_cross_attention``: two tensor-core passes, one along the rows of the map and one along
its columns, merged by their softmaxes' maxima and sums.

Paper: "CCNet: Criss-Cross Attention for Semantic Segmentation", arXiv:1811.11721. Position (y, x) attends, in one
softmax, to the keys of row y and of column x, itself counted once. A softmax over a union of disjoint key sets is
the sum of the sets' softmaxes weighted by their normalisers, so the op splits into two dense attentions within
one line of the map each, both tiled as in FlashAttention-2 (arXiv:2307.08691): q and k tiles of ``BLOCK_M`` /
``BLOCK_N`` positions, scores by ``tl.dot``, online softmax (running maximum and sum, float32), P·V by ``tl.dot``.

Forward (``_cc_fwd_kernel``, one program per line, query block and ``BLOCK_DV`` slice of the values; the scores
are recomputed per slice, which is cheap with CCNet's q/k width C/8 and keeps the accumulator at
[BLOCK_M, BLOCK_DV] for values of 512 channels):

- row pass (``COLUMN=False``): line (b, h, y), the Ws queries of the row against its Ws keys, the query's own
  position included; writes the row's normalised output o_r into ``out`` and its softmax's maximum m_r and sum l_r.
- column pass (``COLUMN=True``): line (b, h, x), the Hs queries against the Hs keys of the column except the
  diagonal (counted in the row pass), loaded with a stride of Ws positions; the epilogue merges with the row pass by
  maxima and sums (top = max(m_r, m_c), w_r = exp(m_r - top)·l_r, w_c = exp(m_c - top)·l_c,
  out = (w_r·o_r + w_c·o_c) / (w_r + w_c)), not by log-sum-exps, which in float32 at logits ~100 are off by up to
  4e-6.

Backward: ``_cc_bwd_stats_kernel`` recomputes the softmax's maximum and sum and delta = rowsum(P·dP) per query
(the row pass stores them, the column pass merges its keys in as the forward does), from the very S and dP that the
gradient kernels form: P = exp(S - max) / sum, dP = dO·Vᵀ (summed over value slices), dS = P·(dP - delta). delta
taken from the forward's output instead, rowsum(dO·O), equals dP at the winning key of a near one-hot softmax only
up to rounding, and dS would keep that rounding (large logits: gradients of 3e-6 where they are 3e-10). Each pass
is then the flash backward restricted to its lines, every kernel forming S and dP as [queries, keys] tiles so that
they agree bit for bit: ``_cc_bwd_dq_kernel`` (per query block, over the key tiles) gives dq = scale·dS·K,
``_cc_bwd_dk_kernel`` (per key block, over the query tiles) dk = scale·dSᵀ·Q, ``_cc_bwd_dv_kernel`` (per key
block and value slice) dv = Pᵀ·dO. The row pass writes dq, dk, dv (and the forward's o_r) in the inputs' dtype;
the column pass, launched after it, adds its share. Every element belongs to one program of a launch: no
atomics, deterministic. Imported only when a Triton path runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._dispatch import bf16_via_fp32, interpret_mode, tile_rows
from .._triton_utils import load_rows, load_tile, online_rowsum_step, online_softmax_step, softmax_finish, store_rows


@triton.jit
def _line(line, HS, WS, COLUMN: tl.constexpr):
    """First flat position (int64), step between positions and length of line ``line``: row (b, h, y) of the map
    in the row pass, column (b, h, x) in the column pass."""
    line = line.to(tl.int64)
    if COLUMN:
        base = (line // WS) * HS * WS + line % WS
        step = WS
        length = HS
    else:
        base = line * WS
        step = 1
        length = WS
    return base, step, length


@triton.jit
def _rows(X, base, step, length, start, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Positions ``start + [0, BLOCK)`` of the line: their indices along it, their flat positions and the tile of
    X's D channels there (0 past the line's end), in X's dtype."""
    idx = start + tl.arange(0, BLOCK)
    pos = base + idx * step
    return idx, pos, load_tile(X, 0, pos, tl.arange(0, BLOCK_D), idx < length, D)


@triton.jit
def _scores(a, b, ia, ib, length, scale, COLUMN: tl.constexpr):
    """``scale·a·bᵀ`` (float32) for the pairs (ia, ib) of positions on the line, -inf where either lies past its end
    or, in the column pass, on the diagonal (the position itself, counted in the row pass). Symmetric in the roles:
    q, k gives the scores, k, q their transpose."""
    valid = (ia[:, None] < length) & (ib[None, :] < length)
    if COLUMN:
        valid = valid & (ia[:, None] != ib[None, :])
    return tl.where(valid, tl.dot(a, tl.trans(b)).to(tl.float32) * scale, float('-inf'))


@triton.jit
def _dot_over_dv(A, B, pos_a, pos_b, mask_a, mask_b, DV, BLOCK_DV: tl.constexpr):
    """``A[pos_a]·B[pos_b]ᵀ`` (float32) over all DV channels, in ``BLOCK_DV`` slices (dP = dO·Vᵀ and its transpose)."""
    acc = tl.zeros([pos_a.shape[0], pos_b.shape[0]], tl.float32)
    for d0 in range(0, DV, BLOCK_DV):
        cols = d0 + tl.arange(0, BLOCK_DV)
        acc += tl.dot(load_tile(A, 0, pos_a, cols, mask_a, DV), tl.trans(load_tile(B, 0, pos_b, cols, mask_b, DV)))
    return acc


@triton.jit
def _probs(Q, MAX, SUM, k, j, base, step, length, m0, scale, DK, COLUMN: tl.constexpr, BLOCK_M: tl.constexpr,
           BLOCK_DK: tl.constexpr):
    """The query tile at ``m0`` (indices, positions, q) and the probabilities P = exp(S - max) / sum [queries, keys]
    between it and the key tile ``k`` at indices ``j``: S in the orientation of the stats and dq kernels, so that all
    backward kernels agree on it bit for bit."""
    i, qpos, q = _rows(Q, base, step, length, m0, DK, BLOCK_M, BLOCK_DK)
    m = tl.load(MAX + qpos, mask=i < length, other=float('inf'))
    inv_sum = 1.0 / tl.load(SUM + qpos, mask=i < length, other=1.0)
    return i, qpos, q, tl.exp(_scores(q, k, i, j, length, scale, COLUMN) - m[:, None]) * inv_sum[:, None]


@triton.jit
def _row_pass_weights(MAX, SUM, qpos, qmask, m):
    """Merge of the row pass's softmax (maximum m_r, sum l_r, stored at ``qpos``) with the column pass's (running
    maximum ``m``): the new maximum top and the weights exp(m_r - top)·l_r of the row pass and exp(m - top) of the
    column pass's unnormalised sums. m_r is finite (a row always holds the query's own key) and l_r >= 1; m is -inf
    where the column holds no other key. Maxima and sums rather than log-sum-exps, exp(lse_r - lse): a float32
    log-sum-exp near 100 is off by up to 4e-6."""
    m_r = tl.load(MAX + qpos, mask=qmask, other=0.0)
    top = tl.maximum(m_r, m)
    return top, tl.exp(m_r - top) * tl.load(SUM + qpos, mask=qmask, other=1.0), tl.exp(m - top)


@triton.jit
def _store_or_add(ptr, pos, cols, mask, d, value, ADD: tl.constexpr):
    """Store ``value`` into the [*, d] array at rows ``pos``, or add it to what the row pass stored there."""
    if ADD:
        value += load_rows(ptr, 0, pos, cols, mask, d)
    store_rows(ptr, 0, pos, cols, mask, d, value)


@triton.jit
def _cc_fwd_kernel(
        Q, K, V, Out, MAX, SUM, HS, WS, DK, DV, scale, COLUMN: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    base, step, length = _line(tl.program_id(0), HS, WS, COLUMN)
    i, qpos, q = _rows(Q, base, step, length, tl.program_id(1) * BLOCK_M, DK, BLOCK_M, BLOCK_DK)
    qmask = i < length
    dv = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    m = tl.full([BLOCK_M], float('-inf'), tl.float32)
    s_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for n0 in range(0, length, BLOCK_N):
        j, kpos, k = _rows(K, base, step, length, n0, DK, BLOCK_N, BLOCK_DK)
        v = load_tile(V, 0, kpos, dv, j < length, DV)
        m, s_sum, acc = online_softmax_step(m, s_sum, acc, _scores(q, k, i, j, length, scale, COLUMN), v)
    if COLUMN:
        _, w_r, w_c = _row_pass_weights(MAX, SUM, qpos, qmask, m)
        inv_sum = 1.0 / (w_r + w_c * s_sum)
        out = (w_r * inv_sum)[:, None] * load_rows(Out, 0, qpos, dv, qmask, DV) + (w_c * inv_sum)[:, None] * acc
        store_rows(Out, 0, qpos, dv, qmask, DV, out)
    else:
        out, _ = softmax_finish(acc, m, s_sum)
        store_rows(Out, 0, qpos, dv, qmask, DV, out)
        if tl.program_id(2) == 0:
            tl.store(MAX + qpos, m, mask=qmask)
            tl.store(SUM + qpos, s_sum, mask=qmask)


@triton.jit
def _cc_bwd_stats_kernel(
        Q, K, V, DO, MAX, SUM, DELTA, HS, WS, DK, DV, scale, COLUMN: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # the softmax's row maximum and sum, and delta = rowsum(P·dP), from the S and dP that the dq and dk kernels form
    # (same tiles, same value slices): the row pass stores them, the column pass merges its keys in
    base, step, length = _line(tl.program_id(0), HS, WS, COLUMN)
    i, qpos, q = _rows(Q, base, step, length, tl.program_id(1) * BLOCK_M, DK, BLOCK_M, BLOCK_DK)
    qmask = i < length
    m = tl.full([BLOCK_M], float('-inf'), tl.float32)
    s_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(0, length, BLOCK_N):
        j, kpos, k = _rows(K, base, step, length, n0, DK, BLOCK_N, BLOCK_DK)
        dp = _dot_over_dv(DO, V, qpos, kpos, qmask, j < length, DV, BLOCK_DV)
        m, s_sum, acc = online_rowsum_step(m, s_sum, acc, _scores(q, k, i, j, length, scale, COLUMN), dp)
    if COLUMN:
        m, w_r, w_c = _row_pass_weights(MAX, SUM, qpos, qmask, m)
        s_sum = w_r + w_c * s_sum
        delta = (w_r * tl.load(DELTA + qpos, mask=qmask, other=0.0) + w_c * acc) / s_sum
    else:
        delta = acc / tl.maximum(s_sum, 1.0)  # >= 1 on the line (the maximum's own term), 0 past its end
    tl.store(MAX + qpos, m, mask=qmask)
    tl.store(SUM + qpos, s_sum, mask=qmask)
    tl.store(DELTA + qpos, delta, mask=qmask)


@triton.jit
def _cc_bwd_dq_kernel(
        Q, K, V, DO, MAX, SUM, DELTA, DQ, HS, WS, DK, DV, scale, COLUMN: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    base, step, length = _line(tl.program_id(0), HS, WS, COLUMN)
    i, qpos, q = _rows(Q, base, step, length, tl.program_id(1) * BLOCK_M, DK, BLOCK_M, BLOCK_DK)
    qmask = i < length
    m = tl.load(MAX + qpos, mask=qmask, other=float('inf'))
    inv_sum = 1.0 / tl.load(SUM + qpos, mask=qmask, other=1.0)
    delta = tl.load(DELTA + qpos, mask=qmask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_DK], tl.float32)
    for n0 in range(0, length, BLOCK_N):
        j, kpos, k = _rows(K, base, step, length, n0, DK, BLOCK_N, BLOCK_DK)
        p = tl.exp(_scores(q, k, i, j, length, scale, COLUMN) - m[:, None]) * inv_sum[:, None]
        ds = p * (_dot_over_dv(DO, V, qpos, kpos, qmask, j < length, DV, BLOCK_DV) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k).to(tl.float32)
    _store_or_add(DQ, qpos, tl.arange(0, BLOCK_DK), qmask, DK, dq * scale, COLUMN)


@triton.jit
def _cc_bwd_dk_kernel(
        Q, K, V, DO, MAX, SUM, DELTA, DKg, HS, WS, DK, DV, scale, COLUMN: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    base, step, length = _line(tl.program_id(0), HS, WS, COLUMN)
    j, kpos, k = _rows(K, base, step, length, tl.program_id(1) * BLOCK_N, DK, BLOCK_N, BLOCK_DK)
    dk_acc = tl.zeros([BLOCK_N, BLOCK_DK], tl.float32)
    for m0 in range(0, length, BLOCK_M):
        i, qpos, q, p = _probs(Q, MAX, SUM, k, j, base, step, length, m0, scale, DK, COLUMN, BLOCK_M, BLOCK_DK)
        delta = tl.load(DELTA + qpos, mask=i < length, other=0.0)
        ds = p * (_dot_over_dv(DO, V, qpos, kpos, i < length, j < length, DV, BLOCK_DV) - delta[:, None])
        dk_acc += tl.dot(tl.trans(ds).to(q.dtype), q).to(tl.float32)
    _store_or_add(DKg, kpos, tl.arange(0, BLOCK_DK), j < length, DK, dk_acc * scale, COLUMN)


@triton.jit
def _cc_bwd_dv_kernel(
        Q, K, DO, MAX, SUM, DVg, HS, WS, DK, DV, scale, COLUMN: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    base, step, length = _line(tl.program_id(0), HS, WS, COLUMN)
    j, kpos, k = _rows(K, base, step, length, tl.program_id(1) * BLOCK_N, DK, BLOCK_N, BLOCK_DK)
    dv = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for m0 in range(0, length, BLOCK_M):
        i, qpos, q, p = _probs(Q, MAX, SUM, k, j, base, step, length, m0, scale, DK, COLUMN, BLOCK_M, BLOCK_DK)
        do = load_tile(DO, 0, qpos, dv, i < length, DV)
        dv_acc += tl.dot(tl.trans(p).to(do.dtype), do).to(tl.float32)
    _store_or_add(DVg, kpos, dv, j < length, DV, dv_acc, COLUMN)


def blocks(length: int, dk: int, dv: int, element_size: int) -> dict:
    """Tile sizes of a pass over lines of ``length`` positions: on a GPU ``BLOCK_DV`` slices of at most 128 values
    and ``tile_rows`` positions per q/k tile (fewer for short lines); in the interpreter (which pays per program
    and per loop step) one slice and one tile per line of up to 128 positions."""
    block_dk = max(16, triton.next_power_of_2(dk))
    line = max(16, triton.next_power_of_2(length))
    if interpret_mode():
        rows, block_dv = min(128, line), max(16, triton.next_power_of_2(dv))
    else:
        block_dv = max(16, min(128, triton.next_power_of_2(dv)))
        rows = min(line, tile_rows(block_dk, block_dv, element_size))
    return dict(BLOCK_M=rows, BLOCK_N=rows, BLOCK_DK=block_dk, BLOCK_DV=block_dv)


def _kernel_cfgs(tiles: dict, element_size: int) -> dict:
    """Launch settings per kernel from the tile sizes ``blocks`` chose: the forward on one warp per 8 query rows (4 at
    least); the backward kernels on 8 warps, dq and dk summing dP = dO·Vᵀ over value slices of 128 bytes a row (one
    slice of ``BLOCK_DV`` in the interpreter). None spills registers on sm_90 at CCNet's sizes in any dtype
    (``benchmarks/kernel_resources.py``); with 4 warps, or slices of ``BLOCK_DV``, dq and dk spill up to 2 KB."""
    slice_dv = tiles['BLOCK_DV'] if interpret_mode() else min(tiles['BLOCK_DV'], max(16, 128 // element_size))
    return dict(fwd=dict(tiles, num_warps=max(4, tiles['BLOCK_M'] // 8)),
                dqdk=dict(tiles, BLOCK_DV=slice_dv, num_warps=8), dv=dict(tiles, num_warps=8))


def _passes(bh: int, hs: int, ws: int, dk: int, dv: int, element_size: int) -> list[tuple[bool, int, int, dict]]:
    """(COLUMN, lines, line length, launch settings per kernel) of the row pass, then the column pass, which adds
    to it."""
    return [(column, bh * (ws if column else hs), hs if column else ws,
             _kernel_cfgs(blocks(hs if column else ws, dk, dv, element_size), element_size))
            for column in (False, True)]


class CrissCrossAttnFn(torch.autograd.Function):
    """Criss-cross attention on [B, H, Hs, Ws, D] as a row pass and a column pass (module docstring)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        b, h, hs, ws, dk = q.shape
        dv = v.shape[-1]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = torch.empty_like(v)
        stats = dict(zip(('MAX', 'SUM'), torch.empty(2, b, h, hs, ws, device=q.device, dtype=torch.float32)))
        passes = _passes(b * h, hs, ws, dk, dv, q.element_size())
        for column, lines, length, cfgs in passes:
            cfg = cfgs['fwd']
            grid = (lines, triton.cdiv(length, cfg['BLOCK_M']), triton.cdiv(dv, cfg['BLOCK_DV']))
            _cc_fwd_kernel[grid](Q=q, K=k, V=v, Out=out, **stats, HS=hs, WS=ws, DK=dk, DV=dv, scale=scale,
                                 COLUMN=column, **cfg)
        ctx.save_for_backward(q, k, v)
        ctx.scale, ctx.passes = scale, passes
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v = ctx.saved_tensors
        b, h, hs, ws, dk = q.shape
        dv = v.shape[-1]
        do = grad.contiguous()
        dq, dkg, dvg = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        stats = dict(zip(('MAX', 'SUM', 'DELTA'), torch.empty(3, b, h, hs, ws, device=q.device, dtype=torch.float32)))
        for column, lines, length, cfgs in ctx.passes:  # both passes' statistics before any gradient
            dqdk = cfgs['dqdk']
            _cc_bwd_stats_kernel[(lines, triton.cdiv(length, dqdk['BLOCK_M']))](
                Q=q, K=k, V=v, DO=do, **stats, HS=hs, WS=ws, DK=dk, DV=dv, scale=ctx.scale, COLUMN=column, **dqdk)
        for column, lines, length, cfgs in ctx.passes:
            args = dict(HS=hs, WS=ws, DK=dk, DV=dv, scale=ctx.scale, COLUMN=column, MAX=stats['MAX'],
                        SUM=stats['SUM'])
            dqdk, dvc = cfgs['dqdk'], cfgs['dv']
            _cc_bwd_dq_kernel[(lines, triton.cdiv(length, dqdk['BLOCK_M']))](
                Q=q, K=k, V=v, DO=do, DELTA=stats['DELTA'], DQ=dq, **args, **dqdk)
            _cc_bwd_dk_kernel[(lines, triton.cdiv(length, dqdk['BLOCK_N']))](
                Q=q, K=k, V=v, DO=do, DELTA=stats['DELTA'], DKg=dkg, **args, **dqdk)
            _cc_bwd_dv_kernel[(lines, triton.cdiv(length, dvc['BLOCK_N']), triton.cdiv(dv, dvc['BLOCK_DV']))](
                Q=q, K=k, DO=do, DVg=dvg, **args, **dvc)
        return dq, dkg, dvg, None


@bf16_via_fp32
def criss_cross_attention_triton(q: Tensor, k: Tensor, v: Tensor, *, scale: float) -> Tensor:
    """Criss-cross attention on [B, H, Hs, Ws, D] (arguments checked by ``criss_cross_attention``)."""
    return CrissCrossAttnFn.apply(q, k, v, scale)
