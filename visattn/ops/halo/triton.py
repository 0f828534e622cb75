"""Triton path of ``halo_attention_2d``.

Forward (``_halo_fwd_kernel``): one program per (batch·head, query tile), a tile being ``BLOCK_Q`` of the (b/s)²
queries of one block. It walks its block's (b + 2h)² window in tiles of ``BLOCK_K`` keys (gathered rows of the key
map; slots outside the map are zero keys in the softmax, or masked out with ``pad_mode='mask'``), scores them with
tensor-core products and runs an online softmax in float32, writing the output and the log-sum-exp per query. The
relative term stays on the chip: the program first forms ``q·rel_h[r]`` and ``q·rel_w[r]`` for every row r of the
two tables (two [BLOCK_Q, 2·win - 1] products), and each score tile picks from them with ``tl.gather`` the row of its
(query, key) offset.

Backward, recomputing the probabilities from the saved log-sum-exp, without atomics on the map:
``_halo_bwd_dq_kernel`` walks a query tile's window for dq (and saves ``delta = rowsum(do·o)``); it sums the score
gradient over each window row and column (products with one-hot matrices), turns those sums into gradients of the
``q·rel`` tables (a gather: for one query, window row and table row are one-to-one) and folds them into dq and into
the rel_h / rel_w gradients, the latter with float32 atomic adds into one small table per batch·head, summed
afterwards. Windows of neighbouring blocks overlap (the halo), so dk and dv come from a key-side kernel,
``_halo_bwd_dkdv_kernel``: a key tile (part of one b×b block of the map) walks the query blocks whose windows reach
it, the (2⌈h/b⌉ + 1)² blocks around its own less those whose window misses the tile, and owns its keys' sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._dispatch import bf16_via_fp32, interpret_mode, tile_rows
from .._triton_utils import load_rows, load_tile, online_softmax_step, softmax_finish, store_rows


@triton.jit
def _rel_table(q, REL, DK, BS: tl.constexpr, HALO: tl.constexpr, BLOCK_DK: tl.constexpr, SPAN_P: tl.constexpr):
    """``q·rel_h[r]`` and ``q·rel_w[r]`` for every row r of the embedding tables: two [len(q), SPAN_P] float32.
    ``REL`` holds rel_h then rel_w, [2, span, DK] with span = 2·(b + 2h) - 1."""
    span = 2 * (BS + 2 * HALO) - 1
    r = tl.arange(0, SPAN_P)
    d = tl.arange(0, BLOCK_DK)
    eh = load_tile(REL, 0, r, d, r < span, DK)
    ew = load_tile(REL, span * DK, r, d, r < span, DK)
    return tl.dot(q, tl.trans(eh)).to(tl.float32), tl.dot(q, tl.trans(ew)).to(tl.float32)


@triton.jit
def _rel_row(key_rc, query_rc, BS: tl.constexpr, HALO: tl.constexpr, REL_STRIDE: tl.constexpr, SPAN_P: tl.constexpr):
    """[queries, keys] row of the embedding table for keys in window row (or column) ``key_rc`` and queries in block
    row (column) ``query_rc``: key - query offset ``key_rc - h - r·query_rc`` plus win - 1 (r = ``REL_STRIDE``; kept
    inside the table for the padding slots)."""
    row = key_rc[None, :] + BS + HALO - 1 - REL_STRIDE * query_rc[:, None]
    return tl.minimum(tl.maximum(row, 0), SPAN_P - 1)


@triton.jit
def _scores(q, k, qeh, qew, uy, ux, ty, tx, BS: tl.constexpr, HALO: tl.constexpr, REL_STRIDE: tl.constexpr,
            HAS_REL: tl.constexpr, SPAN_P: tl.constexpr):
    """Unscaled logits [queries, keys]: q·k plus, with the tables of ``_rel_table``, ``q·(rel_h[..] + rel_w[..])``."""
    s = tl.dot(q, tl.trans(k)).to(tl.float32)
    if HAS_REL:
        s += tl.gather(qeh, _rel_row(uy, ty, BS, HALO, REL_STRIDE, SPAN_P), 1)
        s += tl.gather(qew, _rel_row(ux, tx, BS, HALO, REL_STRIDE, SPAN_P), 1)
    return s


@triton.jit
def _one_hot_t(index, WIN_P: tl.constexpr):
    """[len(index), WIN_P] float32: 1 in column ``index`` of each row."""
    return (index[:, None] == tl.arange(0, WIN_P)[None, :]).to(tl.float32)


@triton.jit
def _rel_backward(dg, t, q, E, DE, DK, BS: tl.constexpr, HALO: tl.constexpr, REL_STRIDE: tl.constexpr,
                  BLOCK_DK: tl.constexpr, SPAN_P: tl.constexpr, WIN_P: tl.constexpr):
    """From ``dg`` [queries, WIN_P], d logit / d (q·rel[row]) summed over each window row (column) for queries in
    block row (column) ``t``: their part of dq (returned) and, added to the table ``DE`` with float32 atomics, of the
    embedding's gradient."""
    span = 2 * (BS + 2 * HALO) - 1
    r = tl.arange(0, SPAN_P)
    d = tl.arange(0, BLOCK_DK)
    u = r[None, :] - (BS + HALO - 1) + REL_STRIDE * t[:, None]  # window row (column) that uses table row r
    inside = (u >= 0) & (u < BS + 2 * HALO)
    dqe = tl.where(inside, tl.gather(dg, tl.minimum(tl.maximum(u, 0), WIN_P - 1), 1), 0.0).to(q.dtype)
    tl.atomic_add(DE + r[:, None] * DK + d[None, :], tl.dot(tl.trans(dqe), q), mask=(r[:, None] < span) & (
        d[None, :] < DK))
    return tl.dot(dqe, load_tile(E, 0, r, d, r < span, DK)).to(tl.float32)


@triton.jit
def _program_tile(TILES: tl.constexpr, NBW, BLOCK: tl.constexpr):
    """Block (by, bx) and row-major slots ``t`` inside it of this program (grid axis 0: blocks × tiles of a block)."""
    blk = tl.program_id(0) // TILES
    return blk // NBW, blk % NBW, (tl.program_id(0) % TILES) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _queries(Q, REL, base, by, bx, t, Hq, Wq, DK, BS: tl.constexpr, HALO: tl.constexpr, STRIDE: tl.constexpr,
             HAS_REL: tl.constexpr, BLOCK_DK: tl.constexpr, SPAN_P: tl.constexpr):
    """Queries ``t`` (row-major in the (b/s)² grid) of block (by, bx): their row and column in the block, flat index
    in the query map, validity, the q tile and its ``_rel_table`` (zeros without embeddings)."""
    bq = BS // STRIDE
    ty = t // bq
    tx = t % bq
    qi = by * bq + ty
    qj = bx * bq + tx
    qvalid = (t < bq * bq) & (qi >= 0) & (qi < Hq) & (qj >= 0) & (qj < Wq)
    qpos = (qi * Wq + qj).to(tl.int64)
    q = load_tile(Q, base, qpos, tl.arange(0, BLOCK_DK), qvalid, DK)
    qeh = tl.zeros([t.shape[0], SPAN_P], tl.float32)
    qew = tl.zeros([t.shape[0], SPAN_P], tl.float32)
    if HAS_REL:
        qeh, qew = _rel_table(q, REL, DK, BS, HALO, BLOCK_DK, SPAN_P)
    return ty, tx, qpos, qvalid, q, qeh, qew


@triton.jit
def _window_tile(K, V, bh, by, bx, u, H, W, DK, DV, BS: tl.constexpr, HALO: tl.constexpr, BLOCK_DK: tl.constexpr,
                 BLOCK_DV: tl.constexpr):
    """Keys ``u`` (row-major in the window) of block (by, bx): their window row and column, whether they lie in the
    map, and the k and v tiles."""
    win = BS + 2 * HALO
    uy = u // win
    ux = u % win
    ky = by * BS - HALO + uy
    kx = bx * BS - HALO + ux
    kvalid = (u < win * win) & (ky >= 0) & (ky < H) & (kx >= 0) & (kx < W)
    kpos = (ky * W + kx).to(tl.int64)
    k = load_tile(K, bh * H * W * DK, kpos, tl.arange(0, BLOCK_DK), kvalid, DK)
    v = load_tile(V, bh * H * W * DV, kpos, tl.arange(0, BLOCK_DV), kvalid, DV)
    return uy, ux, kvalid, k, v


@triton.jit
def _halo_fwd_kernel(
        Q, K, V, REL, Out, LSE, H, W, Hq, Wq, NBH, NBW, DK, DV, scale,
        BS: tl.constexpr, HALO: tl.constexpr, STRIDE: tl.constexpr, REL_STRIDE: tl.constexpr,
        PAD_ZEROS: tl.constexpr, HAS_REL: tl.constexpr, QTILES: tl.constexpr,
        KTILES: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DK: tl.constexpr,
        BLOCK_DV: tl.constexpr, WIN_P: tl.constexpr, SPAN_P: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    by, bx, t = _program_tile(QTILES, NBW, BLOCK_Q)
    ty, tx, qpos, qvalid, q, qeh, qew = _queries(Q, REL, bh * Hq * Wq * DK, by, bx, t, Hq, Wq, DK, BS, HALO, STRIDE,
                                                 HAS_REL, BLOCK_DK, SPAN_P)
    m = tl.full([BLOCK_Q], float('-inf'), tl.float32)
    s_sum = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_DV], tl.float32)
    win = BS + 2 * HALO
    for u0 in range(0, win * win, BLOCK_K):
        uy, ux, kvalid, k, v = _window_tile(K, V, bh, by, bx, u0 + tl.arange(0, BLOCK_K), H, W, DK, DV, BS, HALO,
                                            BLOCK_DK, BLOCK_DV)
        s = _scores(q, k, qeh, qew, uy, ux, ty, tx, BS, HALO, REL_STRIDE, HAS_REL, SPAN_P)
        if PAD_ZEROS:  # the zero keys outside the map take part in the softmax
            kvalid = u0 + tl.arange(0, BLOCK_K) < win * win
        s = tl.where(kvalid[None, :], s * scale, float('-inf'))
        m, s_sum, acc = online_softmax_step(m, s_sum, acc, s, v)
    out, lse = softmax_finish(acc, m, s_sum)
    store_rows(Out, bh * Hq * Wq * DV, qpos, tl.arange(0, BLOCK_DV), qvalid, DV, out)
    tl.store(LSE + bh * Hq * Wq + qpos, lse, mask=qvalid)


@triton.jit
def _halo_bwd_dq_kernel(
        Q, K, V, REL, Out, DO, LSE, DELTA, DQ, DREL, H, W, Hq, Wq, NBH, NBW, DK, DV, scale,
        BS: tl.constexpr, HALO: tl.constexpr, STRIDE: tl.constexpr, REL_STRIDE: tl.constexpr,
        PAD_ZEROS: tl.constexpr, HAS_REL: tl.constexpr, QTILES: tl.constexpr,
        KTILES: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DK: tl.constexpr,
        BLOCK_DV: tl.constexpr, WIN_P: tl.constexpr, SPAN_P: tl.constexpr,
):
    # per query tile: ds = p (do·v - delta); dq = scale·(Σ ds k + Σ dG rel), dG = ds summed over each window row
    # (column), folded into dq and the embedding gradients by ``_rel_backward``
    bh = tl.program_id(1).to(tl.int64)
    by, bx, t = _program_tile(QTILES, NBW, BLOCK_Q)
    ty, tx, qpos, qvalid, q, qeh, qew = _queries(Q, REL, bh * Hq * Wq * DK, by, bx, t, Hq, Wq, DK, BS, HALO, STRIDE,
                                                 HAS_REL, BLOCK_DK, SPAN_P)
    dv = tl.arange(0, BLOCK_DV)
    do = load_rows(DO, bh * Hq * Wq * DV, qpos, dv, qvalid, DV)
    delta = tl.sum(do * load_rows(Out, bh * Hq * Wq * DV, qpos, dv, qvalid, DV), 1)
    do = do.to(DO.dtype.element_ty)
    tl.store(DELTA + bh * Hq * Wq + qpos, delta, mask=qvalid)
    lse = tl.load(LSE + bh * Hq * Wq + qpos, mask=qvalid, other=0.0)
    dgh = tl.zeros([BLOCK_Q, WIN_P], tl.float32)
    dgw = tl.zeros([BLOCK_Q, WIN_P], tl.float32)
    dq = tl.zeros([BLOCK_Q, BLOCK_DK], tl.float32)
    win = BS + 2 * HALO
    for u0 in range(0, win * win, BLOCK_K):
        uy, ux, kvalid, k, v = _window_tile(K, V, bh, by, bx, u0 + tl.arange(0, BLOCK_K), H, W, DK, DV, BS, HALO,
                                            BLOCK_DK, BLOCK_DV)
        s = _scores(q, k, qeh, qew, uy, ux, ty, tx, BS, HALO, REL_STRIDE, HAS_REL, SPAN_P)
        if PAD_ZEROS:
            kvalid = u0 + tl.arange(0, BLOCK_K) < win * win
        p = tl.where(kvalid[None, :], tl.exp(s * scale - lse[:, None]), 0.0)
        ds = (p * (tl.dot(do, tl.trans(v)).to(tl.float32) - delta[:, None])).to(k.dtype)
        dq += tl.dot(ds, k).to(tl.float32)
        if HAS_REL:
            dgh += tl.dot(ds, _one_hot_t(uy, WIN_P).to(k.dtype)).to(tl.float32)
            dgw += tl.dot(ds, _one_hot_t(ux, WIN_P).to(k.dtype)).to(tl.float32)
    dq *= scale
    if HAS_REL:
        span = 2 * win - 1
        dq += _rel_backward(dgh * scale, ty, q, REL, DREL + bh * 2 * span * DK, DK, BS, HALO, REL_STRIDE, BLOCK_DK,
                            SPAN_P, WIN_P)
        dq += _rel_backward(dgw * scale, tx, q, REL + span * DK, DREL + (bh * 2 + 1) * span * DK, DK, BS, HALO,
                            REL_STRIDE, BLOCK_DK, SPAN_P, WIN_P)
    store_rows(DQ, bh * Hq * Wq * DK, qpos, tl.arange(0, BLOCK_DK), qvalid, DK, dq)


@triton.jit
def _halo_bwd_dkdv_kernel(
        Q, K, V, REL, DO, LSE, DELTA, DKg, DVg, H, W, Hq, Wq, NBH, NBW, DK, DV, scale,
        BS: tl.constexpr, HALO: tl.constexpr, STRIDE: tl.constexpr, REL_STRIDE: tl.constexpr,
        PAD_ZEROS: tl.constexpr, HAS_REL: tl.constexpr, QTILES: tl.constexpr,
        KTILES: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DK: tl.constexpr,
        BLOCK_DV: tl.constexpr, WIN_P: tl.constexpr, SPAN_P: tl.constexpr,
):
    # per key tile of one b×b block, over the query blocks whose windows reach it: dv = Σ p do, dk = scale·Σ ds q
    bh = tl.program_id(1).to(tl.int64)
    kby, kbx, t = _program_tile(KTILES, NBW, BLOCK_K)
    ky = kby * BS + t // BS
    kx = kbx * BS + t % BS
    kvalid = (t < BS * BS) & (ky < H) & (kx < W)
    kpos = (ky * W + kx).to(tl.int64)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    k = load_tile(K, bh * H * W * DK, kpos, dk, kvalid, DK)
    v = load_tile(V, bh * H * W * DV, kpos, dv, kvalid, DV)
    dk_acc = tl.zeros([BLOCK_K, BLOCK_DK], tl.float32)
    dv_acc = tl.zeros([BLOCK_K, BLOCK_DV], tl.float32)
    win = BS + 2 * HALO
    reach = (HALO + BS - 1) // BS  # the query blocks that see keys of this one lie at most this many blocks away
    side = 2 * reach + 1
    for nb in range(0, side * side):
        qby = kby + nb // side - reach
        qbx = kbx + nb % side - reach
        uy = ky - qby * BS + HALO  # the keys' row and column in that block's window
        ux = kx - qbx * BS + HALO
        inwin = kvalid & (uy >= 0) & (uy < win) & (ux >= 0) & (ux < win)
        if (qby >= 0) & (qby < NBH) & (qbx >= 0) & (qbx < NBW) & (tl.max(inwin.to(tl.int32), 0) > 0):
            for t0 in range(0, (BS // STRIDE) * (BS // STRIDE), BLOCK_Q):
                ty, tx, qpos, qvalid, q, qeh, qew = _queries(Q, REL, bh * Hq * Wq * DK, qby, qbx,
                                                             t0 + tl.arange(0, BLOCK_Q), Hq, Wq, DK, BS, HALO,
                                                             STRIDE, HAS_REL, BLOCK_DK, SPAN_P)
                do = load_tile(DO, bh * Hq * Wq * DV, qpos, dv, qvalid, DV)
                lse = tl.load(LSE + bh * Hq * Wq + qpos, mask=qvalid, other=0.0)
                delta = tl.load(DELTA + bh * Hq * Wq + qpos, mask=qvalid, other=0.0)
                s = _scores(q, k, qeh, qew, uy, ux, ty, tx, BS, HALO, REL_STRIDE, HAS_REL, SPAN_P)
                p = tl.where(qvalid[:, None] & inwin[None, :], tl.exp(s * scale - lse[:, None]), 0.0)
                dv_acc += tl.dot(tl.trans(p.to(do.dtype)), do).to(tl.float32)
                ds = p * (tl.dot(do, tl.trans(v)).to(tl.float32) - delta[:, None])
                dk_acc += tl.dot(tl.trans(ds.to(q.dtype)), q).to(tl.float32)
    store_rows(DKg, bh * H * W * DK, kpos, dk, kvalid, DK, dk_acc * scale)
    store_rows(DVg, bh * H * W * DV, kpos, dv, kvalid, DV, dv_acc)


BLOCK: int | None = None  # rows of the query and key tiles; None: chosen from the sizes (tests force small tiles)


def _config(dk: int, dv: int, element_size: int, block_size: int, halo_size: int, stride: int, rel_stride: int,
            pad_mode: str) -> dict:
    """Tile sizes and warps: on a GPU ``tile_rows`` (at most the block's queries) on 8 warps, on which no kernel
    spills registers on sm_90 in 16-bit dtypes at HaloNet's sizes with Triton 3.9 (Triton 3.8 spills 72-88 B in the
    key-side backward at b=12, d=64; with 4 warps the forward sits at 255 registers
    and the backward spills; ``benchmarks/kernel_resources.py``); in the interpreter, which pays per program and per
    loop step, one tile per query block and per window where it can."""
    block_dk, block_dv = max(16, triton.next_power_of_2(dk)), max(16, triton.next_power_of_2(dv))
    win, bq = block_size + 2 * halo_size, block_size // stride
    fit_q, fit_k = max(16, triton.next_power_of_2(bq * bq)), max(16, triton.next_power_of_2(win * win))
    if BLOCK:
        rows_q = rows_k = BLOCK
    elif interpret_mode():
        rows_q, rows_k = min(fit_q, 256), min(fit_k, 256)
    else:
        rows_k = tile_rows(block_dk, block_dv, element_size)
        rows_q = min(fit_q, rows_k)
    return dict(BS=block_size, HALO=halo_size, STRIDE=stride, REL_STRIDE=rel_stride, PAD_ZEROS=pad_mode == 'zeros',
                QTILES=triton.cdiv(bq * bq, rows_q),
                KTILES=triton.cdiv(block_size * block_size, rows_k), BLOCK_Q=rows_q, BLOCK_K=rows_k,
                BLOCK_DK=block_dk, BLOCK_DV=block_dv, WIN_P=max(16, triton.next_power_of_2(win)),
                SPAN_P=max(16, triton.next_power_of_2(2 * win - 1)), num_warps=8)


class HaloAttnFn(torch.autograd.Function):
    """Blocked halo attention on q [B, N, Hq, Wq, Dk], k/v [B, N, H, W, D]; forward and backward."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, rel: Tensor | None, block_size: int, halo_size: int,
                stride: int, scale: float, rel_stride: int, pad_mode: str) -> Tensor:
        b, n, h, w, dk = k.shape
        hq, wq, dv = q.shape[2], q.shape[3], v.shape[-1]
        # [B, N, *, *, D] -> [B·N, positions, D]
        q, k, v = (t.contiguous().view(b * n, -1, t.shape[-1]) for t in (q, k, v))
        out = torch.empty(b * n, hq * wq, dv, device=q.device, dtype=q.dtype)
        lse = torch.empty(b * n, hq * wq, device=q.device, dtype=torch.float32)
        rel_c = rel.contiguous() if rel is not None else lse
        nbh, nbw = triton.cdiv(h, block_size), triton.cdiv(w, block_size)
        cfg = dict(H=h, W=w, Hq=hq, Wq=wq, NBH=nbh, NBW=nbw, DK=dk, DV=dv, scale=scale, HAS_REL=rel is not None,
                   **_config(dk, dv, q.element_size(), block_size, halo_size, stride, rel_stride, pad_mode))
        _halo_fwd_kernel[(nbh * nbw * cfg['QTILES'], b * n)](Q=q, K=k, V=v, REL=rel_c, Out=out, LSE=lse, **cfg)
        ctx.save_for_backward(q, k, v, rel_c, out, lse)
        ctx.cfg, ctx.shapes = cfg, ((b, n, hq, wq, dk), (b, n, h, w, dk), (b, n, h, w, dv))
        return out.view(b, n, hq, wq, dv)

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, rel, out, lse = ctx.saved_tensors
        cfg = ctx.cfg
        do = grad.contiguous().view(out.shape)
        dq, dkg, dvg = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        delta = torch.empty_like(lse)
        drel = torch.zeros(q.shape[0], *rel.shape, device=q.device, dtype=torch.float32) if cfg['HAS_REL'] else lse
        blocks, bh = cfg['NBH'] * cfg['NBW'], q.shape[0]
        _halo_bwd_dq_kernel[(blocks * cfg['QTILES'], bh)](Q=q, K=k, V=v, REL=rel, Out=out, DO=do, LSE=lse,
                                                           DELTA=delta, DQ=dq, DREL=drel, **cfg)
        _halo_bwd_dkdv_kernel[(blocks * cfg['KTILES'], bh)](Q=q, K=k, V=v, REL=rel, DO=do, LSE=lse, DELTA=delta,
                                                             DKg=dkg, DVg=dvg, **cfg)
        drel = drel.sum(0).to(rel.dtype) if cfg['HAS_REL'] else None
        sq, sk, sv = ctx.shapes
        return dq.view(sq), dkg.view(sk), dvg.view(sv), drel, None, None, None, None, None, None


@bf16_via_fp32
def halo_attention_2d_triton(q: Tensor, k: Tensor, v: Tensor, *, block_size: int, halo_size: int, stride: int,
                             rel_h: Tensor | None, rel_w: Tensor | None, scale: float, pad_mode: str = 'zeros',
                             rel_stride: int | None = None) -> Tensor:
    """Halo attention on q [B, N, Hq, Wq, Dk], k/v [B, N, H, W, D] (arguments checked by ``halo_attention_2d``)."""
    rel = torch.stack((rel_h, rel_w)) if rel_h is not None else None  # [2, 2·win - 1, Dk]
    rel_stride = stride if rel_stride is None else rel_stride
    return HaloAttnFn.apply(q, k, v, rel, block_size, halo_size, stride, scale, rel_stride, pad_mode)
