"""Triton kernels shared by the softmax ops whose keys are a fixed list per query (dilated local 1-D windows,
2-D neighbourhoods, criss-cross rows and columns).

Each program takes ``BLOCK_M`` queries of one (batch, head) plane and walks the ``NKEYS`` key slots of their
pattern; slot ``t`` of every query is one gathered key, so the scores are row dot products and the softmax is
online (running maximum and sum, float32): nothing but the output and the log-sum-exp per query is written.
The backward recomputes the probabilities from the saved log-sum-exp in two passes without atomics on the map:
one over query blocks for dq (and ``delta = do·o``), one over key blocks that walks, for each key, the queries
that attend it (the pattern seen from the key's side: exact for windows and criss-cross, the (2k-1)² candidates
with a membership test for neighbourhoods) for dk and dv. The relative-position-bias gradient, a few hundred
numbers per head, is summed with float32 atomic adds. Imported only when a Triton path runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._dispatch import bf16_via_fp32, interpret_mode
from ._triton_utils import load_rows, softmax_finish, store_rows

MODE_LOCAL1D = 0
MODE_NEIGHBORHOOD = 1
MODE_CRISS_CROSS = 2


@triton.jit
def _window_start(i, length, KS: tl.constexpr, DIL: tl.constexpr):
    # NATTEN's border rule along one axis: the window stays inside the query's residue class mod DIL.
    r = i % DIL
    g = (length - r + DIL - 1) // DIL
    start = tl.minimum(tl.maximum(i // DIL - KS // 2, 0), g - KS)
    return r + DIL * start


@triton.jit
def _key_slot(pos, t, P, Ws, MODE: tl.constexpr, WINDOW: tl.constexpr, DIL: tl.constexpr, CAUSAL: tl.constexpr):
    """Flat key index, validity and relative-position-bias index of slot ``t`` for the queries ``pos``."""
    if MODE == 0:
        if CAUSAL:
            key = pos + DIL * (t - (WINDOW - 1))
        else:
            key = pos + DIL * (t - WINDOW // 2)
        valid = (key >= 0) & (key < P) & (pos < P)
        bias = key * 0
    elif MODE == 1:
        hs = P // Ws
        y = pos // Ws
        x = pos % Ws
        ky = _window_start(y, hs, WINDOW, DIL) + DIL * (t // WINDOW)
        kx = _window_start(x, Ws, WINDOW, DIL) + DIL * (t % WINDOW)
        key = ky * Ws + kx
        valid = pos < P
        bias = ((ky - y) // DIL + WINDOW - 1) * (2 * WINDOW - 1) + (kx - x) // DIL + WINDOW - 1
    else:
        hs = P // Ws
        y = pos // Ws
        x = pos % Ws
        u = t - hs
        u = u + (u >= x).to(u.dtype)  # the row slots skip the query's own column
        key = tl.where(t < hs, t * Ws + x, y * Ws + u)
        valid = pos < P
        bias = key * 0
    return key, valid, bias


@triton.jit
def _query_slot(key, t, P, Ws, MODE: tl.constexpr, WINDOW: tl.constexpr, DIL: tl.constexpr, CAUSAL: tl.constexpr):
    """Candidate query ``t`` of the keys ``key`` (the pattern seen from the key's side): flat query index, whether
    that query attends the key, and the relative-position-bias index of the pair."""
    if MODE == 0:
        if CAUSAL:
            query = key + DIL * t
        else:
            query = key + DIL * (t - WINDOW // 2)
        valid = (query >= 0) & (query < P) & (key < P)
        bias = query * 0
    elif MODE == 1:
        # the queries whose windows hold the key lie within (WINDOW - 1) steps of it along each axis
        hs = P // Ws
        ky = key // Ws
        kx = key % Ws
        y = ky + DIL * (t // (2 * WINDOW - 1) - (WINDOW - 1))
        x = kx + DIL * (t % (2 * WINDOW - 1) - (WINDOW - 1))
        inside = (y >= 0) & (y < hs) & (x >= 0) & (x < Ws) & (key < P)
        y = tl.minimum(tl.maximum(y, 0), hs - 1)
        x = tl.minimum(tl.maximum(x, 0), Ws - 1)
        dy = ky - _window_start(y, hs, WINDOW, DIL)
        dx = kx - _window_start(x, Ws, WINDOW, DIL)
        valid = inside & (dy >= 0) & (dy < DIL * WINDOW) & (dx >= 0) & (dx < DIL * WINDOW)
        query = y * Ws + x
        bias = ((ky - y) // DIL + WINDOW - 1) * (2 * WINDOW - 1) + (kx - x) // DIL + WINDOW - 1
    else:
        # criss-cross is symmetric: the queries of a key are the keys of a query
        query, valid, bias = _key_slot(key, t, P, Ws, MODE, WINDOW, DIL, CAUSAL)
    return query, valid, bias


@triton.jit
def _slot(K, V, RPB, q, pos, t, bh, P, Ws, NHEADS, DK, DV, dk, dv,
          MODE: tl.constexpr, WINDOW: tl.constexpr, DIL: tl.constexpr, CAUSAL: tl.constexpr, HAS_RPB: tl.constexpr):
    """Key slot ``t`` of the queries ``pos`` (``q`` pre-scaled, float32): flat key index, validity, bias index, the
    gathered k and v rows (float32) and the logits (-inf where the slot is invalid)."""
    key, valid, bias = _key_slot(pos, t, P, Ws, MODE, WINDOW, DIL, CAUSAL)
    key = key.to(tl.int64)
    k = load_rows(K, bh * P * DK, key, dk, valid, DK)
    v = load_rows(V, bh * P * DV, key, dv, valid, DV)
    s = tl.sum(q * k, 1)
    if HAS_RPB:
        span = 2 * WINDOW - 1
        s += tl.load(RPB + (bh % NHEADS) * span * span + bias, mask=valid, other=0.0).to(tl.float32)
    return key, valid, bias, k, v, tl.where(valid, s, float('-inf'))


@triton.jit
def _window_fwd_kernel(
        Q, K, V, Out, LSE, RPB, P, Ws, NKEYS, NHEADS, scale, DK, DV,
        MODE: tl.constexpr, WINDOW: tl.constexpr, DIL: tl.constexpr, CAUSAL: tl.constexpr, HAS_RPB: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    pos = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    qmask = pos < P
    q = load_rows(Q, bh * P * DK, pos, dk, qmask, DK) * scale
    m = tl.full([BLOCK_M], float('-inf'), tl.float32)
    s_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for t in range(0, NKEYS):
        key, valid, bias, k, v, s = _slot(K, V, RPB, q, pos, t, bh, P, Ws, NHEADS, DK, DV, dk, dv,
                                          MODE, WINDOW, DIL, CAUSAL, HAS_RPB)
        m_new = tl.maximum(m, s)
        m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe)
        s_sum = s_sum * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v
        m = m_new
    out, lse = softmax_finish(acc, m, s_sum)
    store_rows(Out, bh * P * DV, pos, dv, qmask, DV, out)
    tl.store(LSE + bh * P + pos, lse, mask=qmask)


@triton.jit
def _window_bwd_dq_kernel(
        Q, K, V, Out, DO, LSE, RPB, DQ, DELTA, DRPB, P, Ws, NKEYS, NHEADS, scale, DK, DV,
        MODE: tl.constexpr, WINDOW: tl.constexpr, DIL: tl.constexpr, CAUSAL: tl.constexpr, HAS_RPB: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # per query block: dq = scale · Σ_t ds_t k_t, ds = p (do·v - delta); saves delta = do·o for the dk/dv pass
    bh = tl.program_id(1).to(tl.int64)
    pos = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    qmask = pos < P
    q = load_rows(Q, bh * P * DK, pos, dk, qmask, DK) * scale
    do = load_rows(DO, bh * P * DV, pos, dv, qmask, DV)
    o = load_rows(Out, bh * P * DV, pos, dv, qmask, DV)
    lse = tl.load(LSE + bh * P + pos, mask=qmask, other=0.0)
    delta = tl.sum(do * o, 1)
    tl.store(DELTA + bh * P + pos, delta, mask=qmask)
    dq = tl.zeros([BLOCK_M, BLOCK_DK], tl.float32)
    span = 2 * WINDOW - 1
    for t in range(0, NKEYS):
        key, valid, bias, k, v, s = _slot(K, V, RPB, q, pos, t, bh, P, Ws, NHEADS, DK, DV, dk, dv,
                                          MODE, WINDOW, DIL, CAUSAL, HAS_RPB)
        p = tl.exp(s - lse)  # 0 where the slot is invalid (s = -inf)
        ds = p * (tl.sum(do * v, 1) - delta)
        dq += ds[:, None] * k
        if HAS_RPB:
            tl.atomic_add(DRPB + (bh % NHEADS) * span * span + bias, ds, mask=valid)
    store_rows(DQ, bh * P * DK, pos, dk, qmask, DK, dq * scale)


@triton.jit
def _window_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, RPB, DKg, DVg, P, Ws, NQUERIES, NHEADS, scale, DK, DV,
        MODE: tl.constexpr, WINDOW: tl.constexpr, DIL: tl.constexpr, CAUSAL: tl.constexpr, HAS_RPB: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # per key block, over the queries that attend each key: dv = Σ p do, dk = scale · Σ ds q (no atomics)
    bh = tl.program_id(1).to(tl.int64)
    key = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    kmask = key < P
    k = load_rows(K, bh * P * DK, key, dk, kmask, DK)
    v = load_rows(V, bh * P * DV, key, dv, kmask, DV)
    dk_acc = tl.zeros([BLOCK_M, BLOCK_DK], tl.float32)
    dv_acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    span = 2 * WINDOW - 1
    for t in range(0, NQUERIES):
        query, valid, bias = _query_slot(key, t, P, Ws, MODE, WINDOW, DIL, CAUSAL)
        query = query.to(tl.int64)
        q = load_rows(Q, bh * P * DK, query, dk, valid, DK) * scale
        do = load_rows(DO, bh * P * DV, query, dv, valid, DV)
        lse = tl.load(LSE + bh * P + query, mask=valid, other=0.0)
        delta = tl.load(DELTA + bh * P + query, mask=valid, other=0.0)
        s = tl.sum(q * k, 1)
        if HAS_RPB:
            s += tl.load(RPB + (bh % NHEADS) * span * span + bias, mask=valid, other=0.0).to(tl.float32)
        p = tl.where(valid, tl.exp(s - lse), 0.0)
        dv_acc += p[:, None] * do
        dk_acc += (p * (tl.sum(do * v, 1) - delta))[:, None] * q
    store_rows(DKg, bh * P * DK, key, dk, kmask, DK, dk_acc)
    store_rows(DVg, bh * P * DV, key, dv, kmask, DV, dv_acc)


def _block_m(p: int, block_dk: int, block_dv: int) -> int:
    """Queries per program: big tiles in the interpreter (it pays per program); on a GPU 64, fewer for wide heads
    (criss-cross values of 512 channels) so that the accumulators stay in registers."""
    if interpret_mode():
        return min(triton.next_power_of_2(p), 256)
    return max(16, min(64, triton.next_power_of_2(8192 // (block_dk + block_dv) + 1) // 2))


class WindowAttnFn(torch.autograd.Function):
    """Softmax attention over a per-query list of keys (see the module docstring); forward and backward."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, rpb: Tensor | None, mode: int, window: int, dilation: int,
                causal: bool, nkeys: int, ws: int, scale: float) -> Tensor:
        b, h = q.shape[:2]
        p = q[0, 0, ..., 0].numel()
        dk, dv = q.shape[-1], v.shape[-1]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o = torch.empty_like(v)
        lse = torch.empty(b, h, p, device=q.device, dtype=torch.float32)
        block_dk, block_dv = triton.next_power_of_2(dk), triton.next_power_of_2(dv)
        cfg = dict(P=p, Ws=ws, NKEYS=nkeys, NHEADS=h, scale=scale, DK=dk, DV=dv, MODE=mode, WINDOW=window,
                   DIL=dilation, CAUSAL=causal, HAS_RPB=rpb is not None, BLOCK_M=_block_m(p, block_dk, block_dv),
                   BLOCK_DK=block_dk, BLOCK_DV=block_dv)
        grid = (triton.cdiv(p, cfg['BLOCK_M']), b * h)
        rpb_c = rpb.contiguous() if rpb is not None else lse
        _window_fwd_kernel[grid](Q=q, K=k, V=v, Out=o, LSE=lse, RPB=rpb_c, **cfg)
        ctx.save_for_backward(q, k, v, o, lse, rpb_c)
        ctx.cfg, ctx.grid, ctx.has_rpb = cfg, grid, rpb is not None
        return o

    @staticmethod
    def backward(ctx, do: Tensor):
        q, k, v, o, lse, rpb = ctx.saved_tensors
        cfg = ctx.cfg
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        delta = torch.empty_like(lse)
        drpb = torch.zeros(rpb.shape, device=q.device, dtype=torch.float32) if ctx.has_rpb else lse
        do = do.contiguous()
        _window_bwd_dq_kernel[ctx.grid](Q=q, K=k, V=v, Out=o, DO=do, LSE=lse, RPB=rpb, DQ=dq, DELTA=delta, DRPB=drpb,
                                        **cfg)
        mode, window = cfg['MODE'], cfg['WINDOW']
        nqueries = (2 * window - 1) ** 2 if mode == MODE_NEIGHBORHOOD else cfg['NKEYS']
        dkdv = {name: cfg[name] for name in cfg if name != 'NKEYS'}
        _window_bwd_dkdv_kernel[ctx.grid](Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=delta, RPB=rpb, DKg=dk, DVg=dv,
                                          NQUERIES=nqueries, **dkdv)
        drpb = drpb.to(rpb.dtype) if ctx.has_rpb else None
        return dq, dk, dv, drpb, None, None, None, None, None, None, None


@bf16_via_fp32
def window_attention(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor | None, *, mode: int, window: int, dilation: int,
                     causal: bool, nkeys: int, ws: int, scale: float) -> Tensor:
    """Run ``WindowAttnFn``.

    Args:
        q, k: [B, H, *S, Dk]; v: [B, H, *S, Dv], S the positions (N, or Hs, Ws).
        rpb: [H, 2·window-1, 2·window-1] bias (neighbourhood mode) or None.
        mode: ``MODE_LOCAL1D``, ``MODE_NEIGHBORHOOD`` or ``MODE_CRISS_CROSS``.
        window, dilation, causal: the pattern's window size, step and causality.
        nkeys: key slots per query; ws: the map's width (2-D modes; 1 for 1-D); scale: factor on q·k.
    """
    return WindowAttnFn.apply(q, k, v, rpb, mode, window, dilation, causal, nkeys, ws, scale)
