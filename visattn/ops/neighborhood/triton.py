"""Triton path of ``neighborhood_attention_2d``: fused tensor-core kernels over 2-D tiles of queries.

The approach is NATTEN's fused neighbourhood attention ("Neighborhood Attention Transformer", Hassani et al.,
arXiv:2204.07143; "Faster Neighborhood Attention: Reducing the O(n^2) Cost of Self Attention at the Threadblock
Level", Hassani, Hwu, Shi, arXiv:2403.04690): attention is computed like FlashAttention, on tiles, and the
neighbourhood only decides which tiles meet and which (query, key) pairs of a tile are masked.

Tiling. With dilation ``d`` the map splits into ``d × d`` residue classes ``(y mod d, x mod d)``; a window never
leaves its query's class, and inside a class (a dense ``gy × gx`` grid) the window of class row ``a`` starts at
``clamp(a - k//2, 0, gy - k)`` (NATTEN's border rule), so every class is plain undilated neighbourhood attention.
A program owns a ``TILE_H × TILE_W`` tile of queries of one class, flattened to ``TILE_H·TILE_W`` rows. Because
the window start is monotone in the query, the keys that the tile's queries attend are the rectangle of class
rows ``[start(a0), start(a_last) + k)`` by the columns alike: ``(TILE_H + k - 1) × (TILE_W + k - 1)`` inside the
map, smaller where a border clips it. That union, flattened row-major, is walked in chunks of ``BLOCK_N`` keys:
``q·kᵀ`` and ``p·v`` are ``tl.dot`` products of a ``[TILE_H·TILE_W, D]`` tile with ``[BLOCK_N, D]`` tiles, each
pair is masked to its query's own window, the relative-position bias is gathered by offset, and the softmax is
online in float32 (base 2); only the output and the log-sum-exp per query are written.

Why tensor cores: a gathered-key kernel (one key per query per step) scores with row dot products on the CUDA
cores; here an 8×8 tile with k = 7 scores its 64 queries against the 14×14 union (196 keys,
7 chunks of 32) with two matrix products per chunk, so the products run on the tensor cores and each key
row is loaded once per tile instead of once per query. At head size 32 the element-wise softmax work per score,
not the products, sets the time, and 49 of the 224 scores of a query are in its window; a 1-D block mask over
the flattened map (FlexAttention's 128-token blocks: 2-3 rows of a 56-wide map, whose windows reach ~5 key
blocks) computes ~640 scores per query for the same 49, about 3× the element-wise work.

Backward (probabilities recomputed from the saved log-sum-exp, no atomics on the map). ``_na_bwd_dq_kernel``
walks the same query tiles and key unions as the forward for ``dq = scale·Σ ds·k`` (``ds = p·(do·v - delta)``,
``delta = rowsum(do·o)`` saved for the next pass) and adds ``ds`` into the bias gradient with float32 atomics,
spread over ``NCOPIES`` copies of the table that the host sums. ``_na_bwd_dkdv_kernel`` owns a tile of keys and
walks the queries that attend any of them, again a rectangle: along each axis the queries whose windows hold
class row ``c`` are ``[c - k//2, c + k//2]``, widened to 0 when ``c < k`` and to ``g - 1`` when ``c >= g - k``
(the border windows are shifted inwards), with every pair tested against its query's window. Imported only when
a Triton path runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._dispatch import bf16_via_fp32, interpret_mode, tile_rows
from .._triton_utils import load_tile, softmax_finish, store_rows

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
OUTSIDE = tl.constexpr(1 << 24)  # window start of a padding query: no key lies in its window


@triton.jit
def _window_start(a, g, KS: tl.constexpr):
    """First row of the window of class row ``a`` in a class of ``g`` rows (NATTEN's border rule)."""
    return tl.minimum(tl.maximum(a - KS // 2, 0), g - KS)


@triton.jit
def _tile_of(pid, Hs, Ws, DIL: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """Program ``pid``'s tile: its residue class ``(ry, rx)`` of ``gy × gx`` positions, and its first class row
    and column (beyond ``gy`` / ``gx`` in the smaller classes' last tiles, which are then empty)."""
    ntx = tl.cdiv(tl.cdiv(Ws, DIL), TILE_W)
    nty = tl.cdiv(tl.cdiv(Hs, DIL), TILE_H)
    cls = pid // (ntx * nty)
    ry = cls // DIL
    rx = cls % DIL
    gy = (Hs - ry + DIL - 1) // DIL
    gx = (Ws - rx + DIL - 1) // DIL
    return ry, rx, gy, gx, (pid // ntx) % nty * TILE_H, pid % ntx * TILE_W


@triton.jit
def _cells(j, a0, b0, ncols, ry, rx, Ws, DIL: tl.constexpr):
    """Cells ``j`` (row-major, ``ncols`` wide) of the class region whose first cell is ``(a0, b0)``: class row,
    class column, flat position in the map."""
    a = a0 + j // ncols
    b = b0 + j % ncols
    return a, b, (ry + DIL * a) * Ws + rx + DIL * b


@triton.jit
def _keys_of_tile(a0, g, TILE: tl.constexpr, KS: tl.constexpr):
    """Along one axis: the first class row of the keys that the queries ``[a0, a0 + TILE) ∩ [0, g)`` attend, and
    how many rows they span."""
    lo = _window_start(a0, g, KS)
    return lo, _window_start(tl.minimum(a0 + TILE - 1, g - 1), g, KS) + KS - lo


@triton.jit
def _queries_of_tile(a0, g, TILE: tl.constexpr, KS: tl.constexpr):
    """Along one axis: the first class row of the queries whose windows hold any key of ``[a0, a0 + TILE) ∩
    [0, g)``, and how many rows they span (see the module docstring)."""
    last = tl.minimum(a0 + TILE - 1, g - 1)
    lo = tl.where(a0 >= KS, a0 - KS // 2, 0)
    return lo, tl.where(last >= g - KS, g - 1, last + KS // 2) + 1 - lo


@triton.jit
def _query_codes(a, b, valid, gy, gx, KS: tl.constexpr):
    """Window start of the queries ``(a, b)`` along each axis (past every key for a padding query) and their code
    in the bias index: key ``(ka, kb)`` takes bias ``(ka - a + k - 1)·(2k - 1) + kb - b + k - 1``, which is
    ``ka·(2k - 1) + kb - code``."""
    sa = tl.where(valid, _window_start(a, gy, KS), OUTSIDE)
    sb = tl.where(valid, _window_start(b, gx, KS), OUTSIDE)
    return sa, sb, a * (2 * KS - 1) + b - (KS - 1) * 2 * KS


@triton.jit
def _logits(x, y, sa, sb, qcode, ka, kb, RPB, rpb_base, scale, KS: tl.constexpr, HAS_RPB: tl.constexpr):
    """Base-2 logits of the (query, key) pairs whose dot products are ``tl.dot(x, y)`` (``q·kᵀ`` or ``k·qᵀ``):
    ``log2(e)·(scale·q·k + bias)``, -inf where the key is outside the query's window; also the in-window mask and
    the bias index. Query arguments (from ``_query_codes``) and key class rows / columns come broadcast to the
    product's shape, in either orientation."""
    # 0 <= ka - sa < KS as one unsigned comparison
    inside = ((ka - sa).to(tl.uint32, bitcast=True) < KS) & ((kb - sb).to(tl.uint32, bitcast=True) < KS)
    rel = ka * (2 * KS - 1) + kb - qcode
    if HAS_RPB:
        # the gathered bias (-inf outside the window) enters as the product's accumulator, so that the scores and
        # the softmax stay in the tensor cores' register layout (added afterwards, the compiler recomputes the
        # softmax in the gather's layout too)
        bias = tl.load(RPB + rpb_base + rel, mask=inside, other=float('-inf')).to(tl.float32)
        s = tl.dot(x, y, bias / scale) * (scale * LOG2E)
    else:
        s = tl.where(inside, tl.dot(x, y) * (scale * LOG2E), float('-inf'))
    return s, inside, rel


@triton.jit
def _query_tile(pid, Hs, Ws, DIL: tl.constexpr, KS: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """Program ``pid``'s query tile in the forward and dq passes: its residue class ``(ry, rx)``, the queries'
    positions, validity and window codes (``_query_codes``), and the union of their windows: first class row and
    column, width, number of cells (0 for an empty tile)."""
    ry, rx, gy, gx, a0, b0 = _tile_of(pid, Hs, Ws, DIL, TILE_H, TILE_W)
    qa, qb, qpos = _cells(tl.arange(0, TILE_H * TILE_W), a0, b0, TILE_W, ry, rx, Ws, DIL)
    qvalid = (qa < gy) & (qb < gx)
    sa, sb, qcode = _query_codes(qa, qb, qvalid, gy, gx, KS)
    ka0, krows = _keys_of_tile(a0, gy, TILE_H, KS)
    kb0, kcols = _keys_of_tile(b0, gx, TILE_W, KS)
    return ry, rx, qpos, qvalid, sa, sb, qcode, ka0, kb0, kcols, tl.where((a0 < gy) & (b0 < gx), krows * kcols, 0)


@triton.jit
def _key_chunk(K, V, RPB, q, j0, k_base, v_base, ry, rx, Ws, ka0, kb0, kcols, count, sa, sb, qcode, rpb_base,
               scale, DK: tl.constexpr, DV: tl.constexpr, KS: tl.constexpr, DIL: tl.constexpr,
               HAS_RPB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Keys ``[j0, j0 + BLOCK_N)`` of a query tile's union: their k and v tiles and the tile's ``_logits`` (the
    scores by ``tl.dot``)."""
    j = j0 + tl.arange(0, BLOCK_N)
    # cells past the union (j >= count) lie below its last row: outside every window of the tile
    ka, kb, kpos = _cells(j, ka0, kb0, kcols, ry, rx, Ws, DIL)
    k = load_tile(K, k_base, kpos, tl.arange(0, BLOCK_DK), j < count, DK)
    v = load_tile(V, v_base, kpos, tl.arange(0, BLOCK_DV), j < count, DV)
    s, inside, rel = _logits(q, tl.trans(k), sa[:, None], sb[:, None], qcode[:, None], ka[None, :], kb[None, :], RPB,
                             rpb_base, scale, KS, HAS_RPB)
    return k, v, s, inside, rel


@triton.jit
def _na_fwd_kernel(
        Q, K, V, Out, LSE, RPB, Hs, Ws, NHEADS, scale,
        DK: tl.constexpr, DV: tl.constexpr, KS: tl.constexpr, DIL: tl.constexpr, HAS_RPB: tl.constexpr,
        TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
        BLOCK_DV: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    P = Hs * Ws
    ry, rx, qpos, qvalid, sa, sb, qcode, ka0, kb0, kcols, count = _query_tile(tl.program_id(0), Hs, Ws, DIL, KS,
                                                                              TILE_H, TILE_W)
    dv = tl.arange(0, BLOCK_DV)
    q = load_tile(Q, bh * P * DK, qpos, tl.arange(0, BLOCK_DK), qvalid, DK)
    rpb_base = (bh % NHEADS) * (2 * KS - 1) * (2 * KS - 1)
    m = tl.full([TILE_H * TILE_W], float('-inf'), tl.float32)
    s_sum = tl.zeros([TILE_H * TILE_W], tl.float32)
    acc = tl.zeros([TILE_H * TILE_W, BLOCK_DV], tl.float32)
    for j0 in range(0, count, BLOCK_N):
        k, v, s, inside, rel = _key_chunk(K, V, RPB, q, j0, bh * P * DK, bh * P * DV, ry, rx, Ws, ka0, kb0, kcols,
                                          count, sa, sb, qcode, rpb_base, scale, DK, DV, KS, DIL, HAS_RPB, BLOCK_N,
                                          BLOCK_DK, BLOCK_DV)
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        s_sum = s_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out, lse = softmax_finish(acc, m * LN2, s_sum)
    store_rows(Out, bh * P * DV, qpos, dv, qvalid, DV, out)
    tl.store(LSE + bh * P + qpos, lse, mask=qvalid)


@triton.jit
def _na_bwd_dq_kernel(
        Q, K, V, Out, DO, LSE, RPB, DQ, DELTA, DRPB, Hs, Ws, NHEADS, NCOPIES, scale,
        DK: tl.constexpr, DV: tl.constexpr, KS: tl.constexpr, DIL: tl.constexpr, HAS_RPB: tl.constexpr,
        TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
        BLOCK_DV: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    P = Hs * Ws
    ry, rx, qpos, qvalid, sa, sb, qcode, ka0, kb0, kcols, count = _query_tile(tl.program_id(0), Hs, Ws, DIL, KS,
                                                                              TILE_H, TILE_W)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    q = load_tile(Q, bh * P * DK, qpos, dk, qvalid, DK)
    do = load_tile(DO, bh * P * DV, qpos, dv, qvalid, DV)
    delta = tl.sum(do.to(tl.float32) * load_tile(Out, bh * P * DV, qpos, dv, qvalid, DV).to(tl.float32), 1)
    tl.store(DELTA + bh * P + qpos, delta, mask=qvalid)
    lse2 = tl.load(LSE + bh * P + qpos, mask=qvalid, other=0.0) * LOG2E
    head = bh % NHEADS
    rpb_base = head * (2 * KS - 1) * (2 * KS - 1)
    drpb_base = (tl.program_id(0) % NCOPIES * NHEADS + head) * (2 * KS - 1) * (2 * KS - 1)
    dq = tl.zeros([TILE_H * TILE_W, BLOCK_DK], tl.float32)
    for j0 in range(0, count, BLOCK_N):
        k, v, s, inside, rel = _key_chunk(K, V, RPB, q, j0, bh * P * DK, bh * P * DV, ry, rx, Ws, ka0, kb0, kcols,
                                          count, sa, sb, qcode, rpb_base, scale, DK, DV, KS, DIL, HAS_RPB, BLOCK_N,
                                          BLOCK_DK, BLOCK_DV)
        p = tl.exp2(s - lse2[:, None])  # 0 outside the windows (s = -inf)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
        if HAS_RPB:
            tl.atomic_add(DRPB + drpb_base + rel, ds, mask=inside, sem='relaxed')
    store_rows(DQ, bh * P * DK, qpos, dk, qvalid, DK, dq * scale)


@triton.jit
def _na_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, RPB, DKg, DVg, Hs, Ws, NHEADS, scale,
        DK: tl.constexpr, DV: tl.constexpr, KS: tl.constexpr, DIL: tl.constexpr, HAS_RPB: tl.constexpr,
        TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
        BLOCK_DV: tl.constexpr,
):
    # scores transposed, [keys of the tile, queries of the chunk]: dv = Σ pᵀ·do, dk = scale · Σ dsᵀ·q
    bh = tl.program_id(1).to(tl.int64)
    P = Hs * Ws
    ry, rx, gy, gx, a0, b0 = _tile_of(tl.program_id(0), Hs, Ws, DIL, TILE_H, TILE_W)
    ka, kb, kpos = _cells(tl.arange(0, TILE_H * TILE_W), a0, b0, TILE_W, ry, rx, Ws, DIL)
    kvalid = (ka < gy) & (kb < gx)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    k = load_tile(K, bh * P * DK, kpos, dk, kvalid, DK)
    v = load_tile(V, bh * P * DV, kpos, dv, kvalid, DV)
    qa0, qrows = _queries_of_tile(a0, gy, TILE_H, KS)
    qb0, qcols = _queries_of_tile(b0, gx, TILE_W, KS)
    count = tl.where((a0 < gy) & (b0 < gx), qrows * qcols, 0)
    rpb_base = (bh % NHEADS) * (2 * KS - 1) * (2 * KS - 1)
    dk_acc = tl.zeros([TILE_H * TILE_W, BLOCK_DK], tl.float32)
    dv_acc = tl.zeros([TILE_H * TILE_W, BLOCK_DV], tl.float32)
    for j0 in range(0, count, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        qa, qb, qpos = _cells(j, qa0, qb0, qcols, ry, rx, Ws, DIL)
        qvalid = j < count
        sa, sb, qcode = _query_codes(qa, qb, qvalid, gy, gx, KS)
        q = load_tile(Q, bh * P * DK, qpos, dk, qvalid, DK)
        do = load_tile(DO, bh * P * DV, qpos, dv, qvalid, DV)
        lse2 = tl.load(LSE + bh * P + qpos, mask=qvalid, other=0.0) * LOG2E
        delta = tl.load(DELTA + bh * P + qpos, mask=qvalid, other=0.0)
        st, inside, rel = _logits(k, tl.trans(q), sa[None, :], sb[None, :], qcode[None, :], ka[:, None], kb[:, None],
                                  RPB, rpb_base, scale, KS, HAS_RPB)
        pt = tl.exp2(st - lse2[None, :])
        dv_acc += tl.dot(pt.to(do.dtype), do)
        dst = pt * (tl.dot(v, tl.trans(do)) - delta[None, :])
        dk_acc += tl.dot(dst.to(q.dtype), q)
    store_rows(DKg, bh * P * DK, kpos, dk, kvalid, DK, dk_acc * scale)
    store_rows(DVg, bh * P * DV, kpos, dv, kvalid, DV, dv_acc)


TILE: tuple[int, int, int] | None = None  # (TILE_H, TILE_W, BLOCK_N) for every kernel; None: ``_tiles``
RPB_GRAD_COPIES = 32  # copies of the bias gradient that the dq pass's atomics spread over


def _tiles(gy: int, gx: int, kernel_size: int, block_dk: int, block_dv: int, element_size: int) -> tuple[int, ...]:
    """``(TILE_H, TILE_W, BLOCK_N)``: on a GPU an 8×8 query tile (4×8 or 4×4 for wide heads, see ``tile_rows``)
    and the chunk of 32 or 64 cells (16 for the widest heads) that pads an inner tile's union of windows least
    (7×32 cells for 7×7 windows on 8×8 tiles, against 4×64); in the interpreter, which pays per program and per
    loop step, one tile and one chunk for a class of up to 16×16."""
    if TILE is not None:
        return TILE
    if interpret_mode():
        th, tw = min(16, triton.next_power_of_2(gy)), min(16, triton.next_power_of_2(gx))
        # the largest region a chunk walks: the keys of a query tile or, near a border, the queries of a key tile
        rows, cols = (min(t + kernel_size - 1 + kernel_size // 2, g) for t, g in ((th, gy), (tw, gx)))
        return th, tw, min(256, triton.next_power_of_2(rows * cols))
    rows = tile_rows(block_dk, block_dv, element_size)
    th, tw = {64: (8, 8), 32: (4, 8), 16: (4, 4)}[rows]
    union = (th + kernel_size - 1) * (tw + kernel_size - 1)
    block_n = min((c for c in (64, 32) if c <= rows), key=lambda c: triton.cdiv(union, c) * c, default=rows)
    return th, tw, block_n


class NeighborhoodAttnFn(torch.autograd.Function):
    """k×k neighbourhood attention on [B, H, Hs, Ws, D] with NATTEN's borders (see the module docstring)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, rpb: Tensor | None, kernel_size: int, dilation: int,
                scale: float) -> Tensor:
        b, h, hs, ws, dk = q.shape
        dv = v.shape[-1]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = torch.empty_like(v)
        lse = torch.empty(b, h, hs, ws, device=q.device, dtype=torch.float32)
        block_dk, block_dv = max(16, triton.next_power_of_2(dk)), max(16, triton.next_power_of_2(dv))
        gy, gx = triton.cdiv(hs, dilation), triton.cdiv(ws, dilation)
        th, tw, block_n = _tiles(gy, gx, kernel_size, block_dk, block_dv, q.element_size())
        cfg = dict(Hs=hs, Ws=ws, NHEADS=h, scale=scale, DK=dk, DV=dv, KS=kernel_size, DIL=dilation,
                   HAS_RPB=rpb is not None, TILE_H=th, TILE_W=tw, BLOCK_N=block_n, BLOCK_DK=block_dk,
                   BLOCK_DV=block_dv)
        grid = (dilation * dilation * triton.cdiv(gy, th) * triton.cdiv(gx, tw), b * h)
        rpb_c = rpb.contiguous() if rpb is not None else lse
        _na_fwd_kernel[grid](Q=q, K=k, V=v, Out=out, LSE=lse, RPB=rpb_c, **cfg)
        ctx.save_for_backward(q, k, v, out, lse, rpb_c)
        ctx.cfg, ctx.grid, ctx.has_rpb = cfg, grid, rpb is not None
        return out

    @staticmethod
    def backward(ctx, do: Tensor):
        q, k, v, out, lse, rpb = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        delta = torch.empty_like(lse)
        # copies of the bias gradient that the tiles' atomics spread over (fewer collisions), summed below
        copies = min(ctx.grid[0], RPB_GRAD_COPIES) if ctx.has_rpb else 1
        drpb = torch.zeros((copies, *rpb.shape), device=q.device, dtype=torch.float32) if ctx.has_rpb else lse
        do = do.contiguous()
        _na_bwd_dq_kernel[ctx.grid](Q=q, K=k, V=v, Out=out, DO=do, LSE=lse, RPB=rpb, DQ=dq, DELTA=delta, DRPB=drpb,
                                    NCOPIES=copies, **ctx.cfg)
        _na_bwd_dkdv_kernel[ctx.grid](Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=delta, RPB=rpb, DKg=dk, DVg=dv,
                                      **ctx.cfg)
        drpb = drpb.sum(0).to(rpb.dtype) if ctx.has_rpb else None
        return dq, dk, dv, drpb, None, None, None


@bf16_via_fp32
def neighborhood_attention_2d_triton(q: Tensor, k: Tensor, v: Tensor, *, kernel_size: int, dilation: int,
                                     rpb: Tensor | None, scale: float) -> Tensor:
    """k×k neighbourhood attention on [B, H, Hs, Ws, D] (arguments checked by ``neighborhood_attention_2d``)."""
    return NeighborhoodAttnFn.apply(q, k, v, rpb, kernel_size, dilation, scale)
