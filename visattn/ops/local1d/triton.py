"""Triton path of ``local_attention_1d``.

Undilated windows run on banded FlashAttention-style kernels: a block of ``BLOCK_M`` queries meets only the key
tiles of its band, scores come from tensor-core products of q and k tiles, positions outside each query's
window are masked, and the softmax is online (running maximum and sum in float32). The backward recomputes the
softmax from q and k alone: ``_local_bwd_dq_kernel`` walks the band of a query block twice, first for the row
maximum and sum of the softmax and ``delta = rowsum(P·dP)`` of the very scores and dP = dO·Vᵀ it differentiates
(saved for the other kernel), then for dq; ``_local_bwd_dkdv_kernel`` walks the transposed band of a key block for
dk and dv, without atomics, forming S and dP in the same [queries, keys] orientation so that they agree bit for
bit. delta taken from the forward's output instead, rowsum(dO·O), is dP at the winning key of a near one-hot
softmax only up to rounding, which dS = P·(dP - delta) keeps (large logits: gradients of 2e-6 where they are
6e-11); and P = exp(S - max) / sum, not exp(S - lse), whose float32 log-sum-exp at logits ~100 is off by up to
4e-6. A dilated window stays inside its query's residue class mod the dilation, where it is an undilated window:
dilation d runs the same kernels on the d strided subsequences (gathered into at most two batches of equal length,
the outputs put back in place).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._dispatch import bf16_via_fp32, tile_rows
from .._triton_utils import online_rowsum_step, online_softmax_step, softmax_finish, store_rows
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
        Q, K, V, Out, N, DK, DV, scale, LO, HI,
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
    out, _ = softmax_finish(acc, m, s_sum)
    store_rows(Out, bh * N * DV, rows, dv, rows < N, DV, out)


@triton.jit
def _scores_and_dp(q, do, K, V, bh, rows, cols, N, DK, DV, scale, LO, HI, BLOCK_DK: tl.constexpr,
                   BLOCK_DV: tl.constexpr):
    """The key tile ``cols``, the scores S = scale·q·kᵀ (float32, -inf outside the window) and dP = dO·vᵀ, both
    [queries, keys]: both backward kernels form them in this orientation, so that they agree bit for bit."""
    k, v, inside = _band_tile(K, V, bh, rows, cols, N, DK, DV, LO, HI, BLOCK_DK, BLOCK_DV)
    s = tl.where(inside, tl.dot(q, tl.trans(k)).to(tl.float32) * scale, float('-inf'))
    return k, s, tl.dot(do, tl.trans(v)).to(tl.float32)


@triton.jit
def _local_bwd_dq_kernel(
        Q, K, V, DO, MAX, SUM, DELTA, DQ, N, DK, DV, scale, LO, HI,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # first over the band for the softmax statistics and delta = rowsum(P·dP) of these very S and dP (saved for the
    # dk/dv kernel), then again for dS = P·(dP - delta). The first loop is not software-pipelined (num_stages=1):
    # pipelining both makes the float32 kernel at heads of 128 spill on sm_90
    bh = tl.program_id(1).to(tl.int64)
    m0 = tl.program_id(0) * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    dk = tl.arange(0, BLOCK_DK)
    q = _tile(Q, bh * N * DK, rows, dk, N, DK)
    do = _tile(DO, bh * N * DV, rows, tl.arange(0, BLOCK_DV), N, DV)
    m = tl.full([BLOCK_M], float('-inf'), tl.float32)
    s_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M], tl.float32)
    start, stop = tl.maximum(m0 + LO, 0), tl.minimum(m0 + BLOCK_M + HI, N)
    for n0 in tl.range(start, stop, BLOCK_N, num_stages=1):
        _, s, dp = _scores_and_dp(q, do, K, V, bh, rows, n0 + tl.arange(0, BLOCK_N), N, DK, DV, scale, LO, HI,
                                  BLOCK_DK, BLOCK_DV)
        m, s_sum, acc = online_rowsum_step(m, s_sum, acc, s, dp)
    m = tl.where(m == float('-inf'), 0.0, m)  # a row past N may meet no key
    s_sum = tl.where(s_sum == 0.0, 1.0, s_sum)
    delta = acc / s_sum
    inv_sum = 1.0 / s_sum
    tl.store(MAX + bh * N + rows, m, mask=rows < N)
    tl.store(SUM + bh * N + rows, s_sum, mask=rows < N)
    tl.store(DELTA + bh * N + rows, delta, mask=rows < N)
    dq = tl.zeros([BLOCK_M, BLOCK_DK], tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        k, s, dp = _scores_and_dp(q, do, K, V, bh, rows, n0 + tl.arange(0, BLOCK_N), N, DK, DV, scale, LO, HI,
                                  BLOCK_DK, BLOCK_DV)
        ds = tl.exp(s - m[:, None]) * inv_sum[:, None] * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k).to(tl.float32)
    store_rows(DQ, bh * N * DK, rows, dk, rows < N, DK, dq * scale)


@triton.jit
def _local_bwd_dkdv_kernel(
        Q, K, V, DO, MAX, SUM, DELTA, DKg, DVg, N, DK, DV, scale, LO, HI,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # key block [n0, n0 + BLOCK_N) is seen by the queries i = j - rel, rel in [LO, HI]
    bh = tl.program_id(1).to(tl.int64)
    n0 = tl.program_id(0) * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    dk_acc = tl.zeros([BLOCK_N, BLOCK_DK], tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for m0 in range(tl.maximum(n0 - HI, 0), tl.minimum(n0 + BLOCK_N - LO, N), BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        q = _tile(Q, bh * N * DK, rows, dk, N, DK)
        do = _tile(DO, bh * N * DV, rows, dv, N, DV)
        m = tl.load(MAX + bh * N + rows, mask=rows < N, other=float('inf'))
        inv_sum = 1.0 / tl.load(SUM + bh * N + rows, mask=rows < N, other=1.0)
        delta = tl.load(DELTA + bh * N + rows, mask=rows < N, other=0.0)
        _, s, dp = _scores_and_dp(q, do, K, V, bh, rows, cols, N, DK, DV, scale, LO, HI, BLOCK_DK, BLOCK_DV)
        p = tl.exp(s - m[:, None]) * inv_sum[:, None]  # [queries, keys]
        dv_acc += tl.dot(tl.trans(p).to(do.dtype), do).to(tl.float32)
        dk_acc += tl.dot(tl.trans(p * (dp - delta[:, None])).to(q.dtype), q).to(tl.float32)
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
        fwd, bwd = _configs(dk, dv, q.element_size())
        sizes = dict(N=n, DK=dk, DV=dv, scale=scale, LO=lo, HI=hi)
        _local_fwd_kernel[(triton.cdiv(n, fwd['BLOCK_M']), b * h)](Q=q, K=k, V=v, Out=out, **sizes, **fwd)
        ctx.save_for_backward(q, k, v)
        ctx.cfg, ctx.shape = {**sizes, **bwd}, (b, h)
        return out.view(b, h, n, dv)

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v = ctx.saved_tensors
        bh, n, dk = q.shape
        dv = v.shape[-1]
        do = grad.contiguous().view(bh, n, dv)
        dq, dkg, dvg = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        stats = dict(zip(('MAX', 'SUM', 'DELTA'), torch.empty(3, bh, n, device=q.device, dtype=torch.float32)))
        grid = (triton.cdiv(n, ctx.cfg['BLOCK_M']), bh)
        _local_bwd_dq_kernel[grid](Q=q, K=k, V=v, DO=do, DQ=dq, **stats, **ctx.cfg)
        _local_bwd_dkdv_kernel[grid](Q=q, K=k, V=v, DO=do, DKg=dkg, DVg=dvg, **stats, **ctx.cfg)
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
