"""Triton path of ``local_attention_1d``.

Undilated windows run on banded FlashAttention-style kernels: a block of ``BLOCK_M`` queries meets only the key
tiles of its band, scores come from tensor-core products of q and k tiles, positions outside each query's
window are masked, and the softmax is online (running maximum and sum in float32); the forward saves the
log-sum-exp per query. The backward recomputes the probabilities: ``_local_bwd_dq_kernel`` walks the band of a
query block for dq (and saves ``delta = rowsum(do·o)``), ``_local_bwd_dkdv_kernel`` walks the transposed band of
a key block for dk and dv, without atomics. A dilated window stays inside its query's residue class mod the
dilation, where it is an undilated window: dilation d runs the same kernels on the d strided subsequences
(gathered into at most two batches of equal length, the outputs put back in place).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._dispatch import bf16_via_fp32, tile_rows
from .._triton_utils import online_softmax_step, softmax_finish, store_rows
from .naive import window_offsets


@triton.jit
def _tile(ptr, base, rows, cols, n, d):
    return tl.load(ptr + base + rows[:, None] * d + cols[None, :], mask=(rows[:, None] < n) & (cols[None, :] < d),
                   other=0.0)


@triton.jit
def _band_tile(K, V, bh, rows, cols, N, DK, DV, LO, HI, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The k and v tiles of keys ``cols`` and which (query, key) pairs of the tile lie in the window."""
    k = _tile(K, bh * N * DK, cols, tl.arange(0, BLOCK_DK), N, DK)
    v = _tile(V, bh * N * DV, cols, tl.arange(0, BLOCK_DV), N, DV)
    rel = cols[None, :] - rows[:, None]
    return k, v, (rel >= LO) & (rel <= HI) & (cols[None, :] < N)


@triton.jit
def _local_fwd_kernel(
        Q, K, V, Out, LSE, N, DK, DV, scale, LO, HI,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    m0 = tl.program_id(0) * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    q = _tile(Q, bh * N * DK, rows, dk, N, DK)
    m = tl.full([BLOCK_M], float('-inf'), tl.float32)
    s_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for n0 in range(tl.maximum(m0 + LO, 0), tl.minimum(m0 + BLOCK_M + HI, N), BLOCK_N):
        k, v, inside = _band_tile(K, V, bh, rows, n0 + tl.arange(0, BLOCK_N), N, DK, DV, LO, HI, BLOCK_DK, BLOCK_DV)
        s = tl.where(inside, tl.dot(q, tl.trans(k)).to(tl.float32) * scale, float('-inf'))
        m, s_sum, acc = online_softmax_step(m, s_sum, acc, s, v)
    out, lse = softmax_finish(acc, m, s_sum)
    store_rows(Out, bh * N * DV, rows, dv, rows < N, DV, out)
    tl.store(LSE + bh * N + rows, lse, mask=rows < N)


@triton.jit
def _local_bwd_dq_kernel(
        Q, K, V, Out, DO, LSE, DELTA, DQ, N, DK, DV, scale, LO, HI,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    m0 = tl.program_id(0) * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    q = _tile(Q, bh * N * DK, rows, dk, N, DK)
    do = _tile(DO, bh * N * DV, rows, dv, N, DV)
    delta = tl.sum(do.to(tl.float32) * _tile(Out, bh * N * DV, rows, dv, N, DV).to(tl.float32), 1)
    tl.store(DELTA + bh * N + rows, delta, mask=rows < N)
    lse = tl.load(LSE + bh * N + rows, mask=rows < N, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_DK], tl.float32)
    for n0 in range(tl.maximum(m0 + LO, 0), tl.minimum(m0 + BLOCK_M + HI, N), BLOCK_N):
        k, v, inside = _band_tile(K, V, bh, rows, n0 + tl.arange(0, BLOCK_N), N, DK, DV, LO, HI, BLOCK_DK, BLOCK_DV)
        p = tl.where(inside, tl.exp(tl.dot(q, tl.trans(k)).to(tl.float32) * scale - lse[:, None]), 0.0)
        ds = p * (tl.dot(do, tl.trans(v)).to(tl.float32) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k).to(tl.float32)
    store_rows(DQ, bh * N * DK, rows, dk, rows < N, DK, dq * scale)


@triton.jit
def _local_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DKg, DVg, N, DK, DV, scale, LO, HI,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # key block [n0, n0 + BLOCK_N) is seen by the queries i = j - rel, rel in [LO, HI]
    bh = tl.program_id(1).to(tl.int64)
    n0 = tl.program_id(0) * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    k = _tile(K, bh * N * DK, cols, dk, N, DK)
    v = _tile(V, bh * N * DV, cols, dv, N, DV)
    dk_acc = tl.zeros([BLOCK_N, BLOCK_DK], tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for m0 in range(tl.maximum(n0 - HI, 0), tl.minimum(n0 + BLOCK_N - LO, N), BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        q = _tile(Q, bh * N * DK, rows, dk, N, DK)
        do = _tile(DO, bh * N * DV, rows, dv, N, DV)
        lse = tl.load(LSE + bh * N + rows, mask=rows < N, other=0.0)
        delta = tl.load(DELTA + bh * N + rows, mask=rows < N, other=0.0)
        rel = cols[:, None] - rows[None, :]  # [keys, queries]
        inside = (rel >= LO) & (rel <= HI) & (rows[None, :] < N)
        pt = tl.where(inside, tl.exp(tl.dot(k, tl.trans(q)).to(tl.float32) * scale - lse[None, :]), 0.0)
        dv_acc += tl.dot(pt.to(do.dtype), do).to(tl.float32)
        dst = pt * (tl.dot(v, tl.trans(do)).to(tl.float32) - delta[None, :])
        dk_acc += tl.dot(dst.to(q.dtype), q).to(tl.float32)
    store_rows(DKg, bh * N * DK, cols, dk, cols < N, DK, dk_acc * scale)
    store_rows(DVg, bh * N * DV, cols, dv, cols < N, DV, dv_acc)


def _configs(dk: int, dv: int, element_size: int) -> tuple[dict, dict]:
    """Tile sizes and warps of the forward and of the backward kernels. The forward takes ``tile_rows`` rows on 4
    warps; the backward kernels hold two float32 accumulators (dk, dv) or dq and the recomputed probabilities, so
    their tiles are sized as for 4-byte elements and run on 8 warps. None of them spills registers on sm_90 at
    Dk = Dv = 64 or 128 in any dtype (``benchmarks/kernel_resources.py``)."""
    block_dk, block_dv = max(16, triton.next_power_of_2(dk)), max(16, triton.next_power_of_2(dv))
    fwd = tile_rows(block_dk, block_dv, element_size)
    bwd = tile_rows(block_dk, block_dv, max(element_size, 4))
    tiles = dict(BLOCK_DK=block_dk, BLOCK_DV=block_dv)
    return (dict(BLOCK_M=fwd, BLOCK_N=fwd, num_warps=4, **tiles), dict(BLOCK_M=bwd, BLOCK_N=bwd, num_warps=8, **tiles))


class LocalAttnFn(torch.autograd.Function):
    """Undilated sliding-window attention on [B, H, N, D] (window ``[i + lo, i + hi]``); forward and backward."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, lo: int, hi: int, scale: float) -> Tensor:
        b, h, n, dk = q.shape
        dv = v.shape[-1]
        # [B, H, N, D] -> [B·H, N, D]
        q, k, v = (t.contiguous().view(b * h, n, t.shape[-1]) for t in (q, k, v))
        out = torch.empty_like(v)
        lse = torch.empty(b * h, n, device=q.device, dtype=torch.float32)
        fwd, bwd = _configs(dk, dv, q.element_size())
        sizes = dict(N=n, DK=dk, DV=dv, scale=scale, LO=lo, HI=hi)
        _local_fwd_kernel[(triton.cdiv(n, fwd['BLOCK_M']), b * h)](Q=q, K=k, V=v, Out=out, LSE=lse, **sizes, **fwd)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cfg, ctx.shape = {**sizes, **bwd}, (b, h)
        return out.view(b, h, n, dv)

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        bh, n, dk = q.shape
        dv = v.shape[-1]
        do = grad.contiguous().view(bh, n, dv)
        dq, dkg, dvg = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        delta = torch.empty_like(lse)
        grid = (triton.cdiv(n, ctx.cfg['BLOCK_M']), bh)
        _local_bwd_dq_kernel[grid](Q=q, K=k, V=v, Out=out, DO=do, LSE=lse, DELTA=delta, DQ=dq, **ctx.cfg)
        _local_bwd_dkdv_kernel[grid](Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=delta, DKg=dkg, DVg=dvg, **ctx.cfg)
        b, h = ctx.shape
        return dq.view(b, h, n, dk), dkg.view(b, h, n, dk), dvg.view(b, h, n, dv), None, None, None


@bf16_via_fp32
def local_attention_1d_triton(q: Tensor, k: Tensor, v: Tensor, *, window: int, dilation: int, causal: bool,
                              scale: float) -> Tensor:
    """Sliding-window attention on [B, H, N, D] (arguments checked by ``local_attention_1d``)."""
    lo, hi = window_offsets(window, 1, causal)
    if dilation == 1:
        return LocalAttnFn.apply(q, k, v, lo, hi, scale)
    b, h, n = q.shape[:3]
    full, extra = divmod(n, dilation)  # residues r < extra have full + 1 positions, the others full
    outs, order = [], []
    for r0, r1, length in ((0, extra, full + 1), (extra, dilation, full)):
        if r1 == r0 or length == 0:
            continue
        idx = (torch.arange(r0, r1, device=q.device)[:, None]
               + dilation * torch.arange(length, device=q.device)[None, :])  # [residues, length]: positions
        q_r, k_r, v_r = (t[:, :, idx].reshape(b, h * (r1 - r0), length, t.shape[-1]) for t in (q, k, v))
        outs.append(LocalAttnFn.apply(q_r, k_r, v_r, lo, hi, scale).reshape(b, h, -1, v.shape[-1]))
        order.append(idx.flatten())
    inverse = torch.empty(n, dtype=torch.long, device=q.device)
    order = torch.cat(order)
    inverse[order] = torch.arange(n, device=q.device)
    return torch.cat(outs, dim=2)[:, :, inverse]
