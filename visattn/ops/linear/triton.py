"""Triton path of ``linear_attention``: kernels and the autograd.Function.

The N axis of each (batch, head) is cut into chunks of whole ``BLOCK_N`` tiles, one program per (batch·head,
chunk). ``_state_kernel`` writes each chunk's own state ``S_c = Σ_{n in c} k_n v_nᵀ``, ``z_c = Σ_{n in c} k_n``
into a float32 buffer ``[B·H, C, BLOCK_DK, BLOCK_DV]`` (+ ``[B·H, C, BLOCK_DK]``). Non-causal: the chunk states
are summed (PyTorch) and ``_apply_fwd_kernel`` writes ``out = q S / (q·z + eps)`` tile by tile. Causal (the
chunkwise form of Katharopoulos et al., arXiv:2006.16236, as in GLA, arXiv:2312.06635): an exclusive prefix sum
over the chunks (``torch.cumsum``) gives the state before each chunk, and ``_chunk_fwd_kernel`` runs every chunk in
parallel, ``out = (q S_prev + masked(q kᵀ) v) / (q·z_prev + rowsum(masked(q kᵀ)) + eps)`` tile by tile, adding
each tile's own ``kᵀv`` to the state for the next tile of its chunk. The normaliser ``den`` is saved per query.

The backward mirrors both. ``_state_kernel`` writes per chunk ``dS_c = Σ q dnumᵀ``, ``dz_c = Σ dden q``
(``dnum = do / den``, ``dden = -do·out / den``). Non-causal: summed, then ``_apply_bwd_dq_kernel`` writes dq
(from S, z) and ``_apply_bwd_dkdv_kernel`` dk, dv (from dS, dz), so that neither holds two states. Causal:
``_chunk_bwd_dq_kernel`` reads the prefix states saved by the forward; an exclusive suffix sum of the
chunks' ``dS``, ``dz`` (the queries after each chunk) feeds ``_chunk_bwd_dkdv_kernel``, which walks its chunk's
tiles last to first. For heads over 64 both work on slices of the state, a third grid axis numbering them: dq
and dk on rows of it (Dk slices), dv on columns (Dv slices). Every product accumulates in float32.

Chunks: ``_num_splits`` gives enough per (batch, head) that B·H·C programs fill a GPU (``_PROGRAMS``, two per SM
of an H100), at most one per tile. So the state buffer is at most ``(_PROGRAMS + B·H)·BLOCK_DK·BLOCK_DV`` floats
whatever N is: ≤ 4.3 MB + 16 KB·B·H at Dk = Dv = 64, ≤ 17 MB + 64 KB·B·H at 128; the causal forward saves its
prefix states for the backward, which holds a few such buffers at once (chunk states, suffix sums). With many
(batch, head) pairs C is 1 and each program walks its whole sequence.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._dispatch import bf16_via_fp32, interpret_mode, tile_rows
from .._triton_utils import load_rows, store_rows

_PROGRAMS = 264  # programs that fill an H100's 132 SMs twice


@triton.jit
def _load_rows(ptr, base, rows, cols, n, d):
    return load_rows(ptr, base, rows, cols, rows < n, d)


@triton.jit
def _store_rows(ptr, base, rows, cols, n, d, value):
    store_rows(ptr, base, rows, cols, rows < n, d, value)


@triton.jit
def _grads_of_normalised(DO, Out, DEN, bh, rows, dv, N, DV):
    # out = num / den: dnum = do / den, dden = -Σ_v do·out / den
    do = _load_rows(DO, bh * N * DV, rows, dv, N, DV)
    o = _load_rows(Out, bh * N * DV, rows, dv, N, DV)
    den = tl.load(DEN + bh * N + rows, mask=rows < N, other=1.0)
    return do / den[:, None], -tl.sum(do * o, 1) / den


@triton.jit
def _state_offsets(slot, da, db, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr):
    # offsets of state ``slot`` in the float32 buffers S [*, BLOCK_DA, BLOCK_DB] and Z [*, BLOCK_DA]
    return slot * BLOCK_DA * BLOCK_DB + da[:, None] * BLOCK_DB + db[None, :], slot * BLOCK_DA + da


@triton.jit
def _chunk_slot():
    # grid (B·H, C): the slot [B·H, C] of this program's chunk in a state buffer
    return tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)


@triton.jit
def _state_kernel(
        A, B, Out, DEN, S, Z, N, DA, DB, ROWS_PER_PROG,
        BWD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
):
    # grid (B·H, C), a chunk of ROWS_PER_PROG rows each; forward (A = k, B = v): S_c = Aᵀ B, Z_c = Σ A;
    # backward (A = q, B = do): S_c = Aᵀ dnum, Z_c = Aᵀ dden
    bh = tl.program_id(0).to(tl.int64)
    da = tl.arange(0, BLOCK_DA)
    db = tl.arange(0, BLOCK_DB)
    s = tl.zeros([BLOCK_DA, BLOCK_DB], tl.float32)
    z = tl.zeros([BLOCK_DA], tl.float32)
    lo = tl.program_id(1) * ROWS_PER_PROG
    for start in range(lo, tl.minimum(lo + ROWS_PER_PROG, N), BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        a = _load_rows(A, bh * N * DA, rows, da, N, DA)
        if BWD:
            b, w = _grads_of_normalised(B, Out, DEN, bh, rows, db, N, DB)
            z += tl.sum(a * w[:, None], 0)
        else:
            b = _load_rows(B, bh * N * DB, rows, db, N, DB)
            z += tl.sum(a, 0)
        s += tl.dot(tl.trans(a), b)
    at_s, at_z = _state_offsets(_chunk_slot(), da, db, BLOCK_DA, BLOCK_DB)
    tl.store(S + at_s, s)
    tl.store(Z + at_z, z)


@triton.jit
def _apply_start(BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    # grid (N tiles, B·H): the program's (batch, head), rows, head-dim ranges and the offsets of its summed state
    bh = tl.program_id(1).to(tl.int64)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    at_s, at_z = _state_offsets(bh, dk, dv, BLOCK_DK, BLOCK_DV)
    return bh, tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N), dk, dv, at_s, at_z


@triton.jit
def _apply_fwd_kernel(
        Q, S, Z, Out, DEN, N, DK, DV, eps,
        BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh, rows, dk, dv, at_s, at_z = _apply_start(BLOCK_N, BLOCK_DK, BLOCK_DV)
    q = _load_rows(Q, bh * N * DK, rows, dk, N, DK)
    s = tl.load(S + at_s)
    den = tl.sum(q * tl.load(Z + at_z)[None, :], 1) + eps
    _store_rows(Out, bh * N * DV, rows, dv, N, DV, tl.dot(q, s) / den[:, None])
    tl.store(DEN + bh * N + rows, den, mask=rows < N)


@triton.jit
def _apply_bwd_dq_kernel(
        DO, Out, DEN, S, Z, DQ, N, DK, DV,
        BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # dq = dnum Sᵀ + dden zᵀ
    bh, rows, dk, dv, at_s, at_z = _apply_start(BLOCK_N, BLOCK_DK, BLOCK_DV)
    dnum, dden = _grads_of_normalised(DO, Out, DEN, bh, rows, dv, N, DV)
    dq = tl.dot(dnum, tl.trans(tl.load(S + at_s))) + dden[:, None] * tl.load(Z + at_z)[None, :]
    _store_rows(DQ, bh * N * DK, rows, dk, N, DK, dq)


@triton.jit
def _apply_bwd_dkdv_kernel(
        K, V, DS, DZ, DKg, DVg, N, DK, DV,
        BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # dk = v dSᵀ + dz, dv = k dS
    bh, rows, dk, dv, at_s, at_z = _apply_start(BLOCK_N, BLOCK_DK, BLOCK_DV)
    ds = tl.load(DS + at_s)
    k = _load_rows(K, bh * N * DK, rows, dk, N, DK)
    v = _load_rows(V, bh * N * DV, rows, dv, N, DV)
    _store_rows(DKg, bh * N * DK, rows, dk, N, DK, tl.dot(v, tl.trans(ds)) + tl.load(DZ + at_z)[None, :])
    _store_rows(DVg, bh * N * DV, rows, dv, N, DV, tl.dot(k, ds))


@triton.jit
def _chunk_start(S, Z, ROWS_PER_PROG, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_SK: tl.constexpr,
                 BLOCK_SV: tl.constexpr):
    # grid (B·H, C, slices): the program's (batch, head), its slice of the state (rows k0 + [0, BLOCK_SK) of Dk and
    # columns v0 + [0, BLOCK_SV) of Dv; all of a dimension unless its slice is narrower, the third grid axis then
    # numbering the slices) as index ranges, that slice as stored for its chunk, and the chunk's first row
    k0 = 0
    v0 = 0
    if BLOCK_SK < BLOCK_DK:
        k0 = tl.program_id(2) * BLOCK_SK
    if BLOCK_SV < BLOCK_DV:
        v0 = tl.program_id(2) * BLOCK_SV
    dk = k0 + tl.arange(0, BLOCK_SK)
    dv = v0 + tl.arange(0, BLOCK_SV)
    at_s, at_z = _state_offsets(_chunk_slot(), dk, dv, BLOCK_DK, BLOCK_DV)
    bh = tl.program_id(0).to(tl.int64)
    return bh, dk, dv, tl.load(S + at_s), tl.load(Z + at_z), tl.program_id(1) * ROWS_PER_PROG


@triton.jit
def _chunk_fwd_kernel(
        Q, K, V, S, Z, Out, DEN, N, DK, DV, ROWS_PER_PROG, eps,
        BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # grid (B·H, C); S, Z: the state of the chunks before this one, then this chunk's own tiles in order
    bh, dk, dv, s, z, lo = _chunk_start(S, Z, ROWS_PER_PROG, BLOCK_DK, BLOCK_DV, BLOCK_DK, BLOCK_DV)
    for start in range(lo, tl.minimum(lo + ROWS_PER_PROG, N), BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        q = _load_rows(Q, bh * N * DK, rows, dk, N, DK)
        k = _load_rows(K, bh * N * DK, rows, dk, N, DK)
        v = _load_rows(V, bh * N * DV, rows, dv, N, DV)
        a = tl.where(rows[:, None] >= rows[None, :], tl.dot(q, tl.trans(k)), 0.0)  # [BLOCK_N, BLOCK_N]
        den = tl.sum(q * z[None, :], 1) + tl.sum(a, 1) + eps
        _store_rows(Out, bh * N * DV, rows, dv, N, DV, (tl.dot(q, s) + tl.dot(a, v)) / den[:, None])
        tl.store(DEN + bh * N + rows, den, mask=rows < N)
        s += tl.dot(tl.trans(k), v)
        z += tl.sum(k, 0)


@triton.jit
def _chunk_bwd_dq_kernel(
        K, V, DO, Out, DEN, S, Z, DQ, N, DK, DV, ROWS_PER_PROG,
        BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_SK: tl.constexpr,
):
    # grid (B·H, C, Dk slices); S, Z: the forward's state before this chunk (rows of the slice), then its tiles in
    # order: dq_i = dnum_i S_prevᵀ + dden_i z_prev + Σ_{j in tile, j <= i} (dnum_i·v_j + dden_i) k_j
    bh, dk, dv, s, z, lo = _chunk_start(S, Z, ROWS_PER_PROG, BLOCK_DK, BLOCK_DV, BLOCK_SK, BLOCK_DV)
    for start in range(lo, tl.minimum(lo + ROWS_PER_PROG, N), BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        k = _load_rows(K, bh * N * DK, rows, dk, N, DK)
        v = _load_rows(V, bh * N * DV, rows, dv, N, DV)
        dnum, dden = _grads_of_normalised(DO, Out, DEN, bh, rows, dv, N, DV)
        da = tl.where(rows[:, None] >= rows[None, :], tl.dot(dnum, tl.trans(v)) + dden[:, None], 0.0)
        dq = tl.dot(dnum, tl.trans(s)) + dden[:, None] * z[None, :] + tl.dot(da, k)
        _store_rows(DQ, bh * N * DK, rows, dk, N, DK, dq)
        s += tl.dot(tl.trans(k), v)
        z += tl.sum(k, 0)


@triton.jit
def _chunk_bwd_dkdv_kernel(
        Q, K, V, DO, Out, DEN, DS, DZ, DKg, DVg, N, DK, DV, ROWS_PER_PROG,
        BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_SK: tl.constexpr,
        BLOCK_SV: tl.constexpr, WRITE_DK: tl.constexpr, WRITE_DV: tl.constexpr,
):
    # grid (B·H, C, slices); DS = Σ q_i dnum_iᵀ, DZ = Σ dden_i q_i over the queries after this chunk, then its tiles
    # last to first: dk_j = dS v_j + dz + Σ_{i in tile, i >= j} dA_ij q_i, dv_j = dSᵀ k_j + Σ_{i in tile, i >= j}
    # A_ij dnum_i. Both at once on the whole state, or (wide heads) dk on Dk slices of it (WRITE_DK, BLOCK_SV =
    # BLOCK_DV) and dv on Dv slices (WRITE_DV, BLOCK_SK = BLOCK_DK), so that a program holds half the state or less
    bh, dk, dv, ds, dz, lo = _chunk_start(DS, DZ, ROWS_PER_PROG, BLOCK_DK, BLOCK_DV, BLOCK_SK, BLOCK_SV)
    n_tiles = tl.cdiv(tl.minimum(ROWS_PER_PROG, N - lo), BLOCK_N)
    for t in range(0, n_tiles):
        rows = lo + (n_tiles - 1 - t) * BLOCK_N + tl.arange(0, BLOCK_N)
        q = _load_rows(Q, bh * N * DK, rows, dk, N, DK)
        dnum, dden = _grads_of_normalised(DO, Out, DEN, bh, rows, dv, N, DV)
        causal = rows[:, None] >= rows[None, :]
        if WRITE_DK:  # dv spans all of Dv
            v = _load_rows(V, bh * N * DV, rows, dv, N, DV)
            da = tl.where(causal, tl.dot(dnum, tl.trans(v)) + dden[:, None], 0.0)
            dk_t = tl.dot(v, tl.trans(ds)) + dz[None, :] + tl.dot(tl.trans(da), q)
            _store_rows(DKg, bh * N * DK, rows, dk, N, DK, dk_t)
            dz += tl.sum(q * dden[:, None], 0)
        if WRITE_DV:  # dk spans all of Dk
            k = _load_rows(K, bh * N * DK, rows, dk, N, DK)
            a = tl.where(causal, tl.dot(q, tl.trans(k)), 0.0)
            _store_rows(DVg, bh * N * DV, rows, dv, N, DV, tl.dot(k, ds) + tl.dot(tl.trans(a), dnum))
        ds += tl.dot(tl.trans(q), dnum)


def _cfg(n: int, dk: int, dv: int) -> dict:
    """Launch settings: ``tiles`` (the head widths, padded), per kernel family its ``BLOCK_N`` rows and warps, and
    the ``slice`` width of the parts that the causal backward cuts a wide state into.

    The kernels hold float32 states [BLOCK_DK, BLOCK_DV] in registers beside their tiles. The settings are the
    largest tiles on which none of them spills registers on sm_90 in 16-bit dtypes at Dk = Dv = 64 and 128, as
    compiled offline by ``benchmarks/kernel_resources.py``: ``tile_rows`` of 4-byte elements for the state and
    apply kernels (8 warps where they hold a state and the tiles of a product; half as many rows in the backward
    for heads over 64), and 16-row tiles on 8 warps, double-buffered, for the causal chunk kernels, which also
    hold a [BLOCK_N, BLOCK_N] score tile and two products. For heads over 64 the causal backward works on
    64-wide parts of the state (dq and dk over Dk slices, dv over Dv slices): at Dk = Dv = 128 the whole state
    alone takes 64 registers a thread. The interpreter, which pays per loop step, takes one tile of up to 64 rows
    everywhere and one slice."""
    block_dk, block_dv = max(16, triton.next_power_of_2(dk)), max(16, triton.next_power_of_2(dv))
    tiles = dict(BLOCK_DK=block_dk, BLOCK_DV=block_dv)
    if interpret_mode():
        rows = dict(BLOCK_N=max(16, min(triton.next_power_of_2(n), 64)))
        return dict(tiles=tiles, state=rows, apply_fwd=rows, apply_bwd=rows, chunk=rows,
                    slice=max(block_dk, block_dv))
    rows = tile_rows(block_dk, block_dv, 4)
    return dict(tiles=tiles, state=dict(BLOCK_N=rows, num_warps=8), apply_fwd=dict(BLOCK_N=rows, num_warps=4),
                apply_bwd=dict(BLOCK_N=rows if max(block_dk, block_dv) <= 64 else rows // 2, num_warps=8),
                chunk=dict(BLOCK_N=16, num_warps=8, num_stages=2),
                slice=64)


def _causal_bwd_parts(cfg: dict) -> list[tuple[int, dict]]:
    """(slices, constexprs) of the causal backward's launches over the state: first ``_chunk_bwd_dq_kernel`` (on Dk
    slices, ``BLOCK_SK``), then ``_chunk_bwd_dkdv_kernel`` once on the whole state, or for heads wider than
    ``slice`` twice: dk on Dk slices and dv on Dv slices."""
    block_dk, block_dv = cfg['tiles']['BLOCK_DK'], cfg['tiles']['BLOCK_DV']
    sk, sv = min(block_dk, cfg['slice']), min(block_dv, cfg['slice'])
    dq = (block_dk // sk, dict(BLOCK_SK=sk))
    if (sk, sv) == (block_dk, block_dv):  # dk and dv together on the whole state
        return [dq, (1, dict(BLOCK_SK=sk, BLOCK_SV=sv, WRITE_DK=True, WRITE_DV=True))]
    return [dq, (block_dk // sk, dict(BLOCK_SK=sk, BLOCK_SV=block_dv, WRITE_DK=True, WRITE_DV=False)),
            (block_dv // sv, dict(BLOCK_SK=block_dk, BLOCK_SV=sv, WRITE_DK=False, WRITE_DV=True))]


def _num_splits(n: int, bh: int, block_n: int) -> int:
    """Chunks of the N axis of one (batch, head): enough that B·H·chunks programs fill a GPU (``_PROGRAMS``), at
    most one per tile (one in the interpreter)."""
    return 1 if interpret_mode() else max(1, min(triton.cdiv(n, block_n), triton.cdiv(_PROGRAMS, bh)))


def _chunk_rows(n: int, bh: int, cfg: dict) -> int:
    """Rows of one chunk: whole tiles of every kernel that walks it (one at least), at most ``_num_splits`` chunks
    (fewer where tiles round up)."""
    block_n = max(cfg['state']['BLOCK_N'], cfg['chunk']['BLOCK_N'])
    return max(1, triton.cdiv(triton.cdiv(n, _num_splits(n, bh, block_n)), block_n)) * block_n


def _chunk_states(a: Tensor, b: Tensor, out: Tensor | None, den: Tensor | None, rows: int,
                  cfg: dict) -> tuple[Tensor, Tensor]:
    """Each chunk's ``(Σ_n a_n b_nᵀ, Σ_n a_n)`` (forward) or ``(Σ q dnumᵀ, Σ dden q)`` (backward, ``out`` given), over
    chunks of ``rows`` rows: float32 [B·H, C, BLOCK_DA, BLOCK_DB] and [B·H, C, BLOCK_DA], zero in the padding."""
    bh, n, da = a.shape
    chunks = max(1, triton.cdiv(n, rows))  # N = 0: one empty chunk, zero states
    block_a, block_b = cfg['tiles']['BLOCK_DK'], cfg['tiles']['BLOCK_DV']
    s = torch.empty(bh, chunks, block_a, block_b, device=a.device, dtype=torch.float32)
    z = torch.empty(bh, chunks, block_a, device=a.device, dtype=torch.float32)
    bwd = out is not None
    _state_kernel[(bh, chunks)](
        A=a, B=b, Out=out if bwd else b, DEN=den if bwd else z, S=s, Z=z, N=n, DA=da, DB=b.shape[-1],
        ROWS_PER_PROG=rows, BWD=bwd, BLOCK_DA=block_a, BLOCK_DB=block_b, **cfg['state'])
    return s, z


def _exclusive_cumsum(x: Tensor, reverse: bool = False) -> Tensor:
    """Sum of the chunk states ``x`` [B·H, C, ...] over the chunks before each chunk (after it when ``reverse``)."""
    if reverse:
        return _exclusive_cumsum(x.flip(1)).flip(1)
    out = torch.zeros_like(x)
    torch.cumsum(x[:, :-1], 1, out=out[:, 1:])
    return out


class LinearAttnFn(torch.autograd.Function):
    """Normalised linear attention on feature-mapped q, k (see the module docstring); forward and backward."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, causal: bool, eps: float) -> Tensor:
        b, h, n, dk = q.shape
        dv = v.shape[-1]
        # [B, H, N, D] -> [B·H, N, D]
        q, k, v = (t.contiguous().view(b * h, n, t.shape[-1]) for t in (q, k, v))
        cfg = _cfg(n, dk, dv)
        rows = _chunk_rows(n, b * h, cfg)
        out = torch.empty_like(v)
        den = torch.empty(b * h, n, device=q.device, dtype=torch.float32)
        s, z = _chunk_states(k, v, None, None, rows, cfg)
        if causal:
            s, z = _exclusive_cumsum(s), _exclusive_cumsum(z)
            _chunk_fwd_kernel[s.shape[:2]](Q=q, K=k, V=v, S=s, Z=z, Out=out, DEN=den, N=n, DK=dk, DV=dv,
                                           ROWS_PER_PROG=rows, eps=eps, **cfg['tiles'], **cfg['chunk'])
        else:
            s, z = s.sum(1), z.sum(1)
            grid = (triton.cdiv(n, cfg['apply_fwd']['BLOCK_N']), b * h)
            _apply_fwd_kernel[grid](Q=q, S=s, Z=z, Out=out, DEN=den, N=n, DK=dk, DV=dv, eps=eps, **cfg['tiles'],
                                    **cfg['apply_fwd'])
        ctx.save_for_backward(q, k, v, out, den, s, z)
        ctx.causal, ctx.cfg, ctx.rows, ctx.shape = causal, cfg, rows, (b, h)
        return out.view(b, h, n, dv)

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, out, den, s, z = ctx.saved_tensors
        bh, n, dk = q.shape
        dv = v.shape[-1]
        cfg = ctx.cfg
        do = grad.contiguous().view(bh, n, dv)
        dq, dkg, dvg = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        sizes = dict(N=n, DK=dk, DV=dv, **cfg['tiles'])
        ds, dz = _chunk_states(q, do, out, den, ctx.rows, cfg)
        if ctx.causal:
            chunk = dict(ROWS_PER_PROG=ctx.rows, **sizes, **cfg['chunk'])
            (slices, part), *dkdv = _causal_bwd_parts(cfg)
            _chunk_bwd_dq_kernel[(*s.shape[:2], slices)](K=k, V=v, DO=do, Out=out, DEN=den, S=s, Z=z, DQ=dq, **part,
                                                         **chunk)
            ds, dz = _exclusive_cumsum(ds, reverse=True), _exclusive_cumsum(dz, reverse=True)
            for slices, part in dkdv:
                _chunk_bwd_dkdv_kernel[(*s.shape[:2], slices)](Q=q, K=k, V=v, DO=do, Out=out, DEN=den, DS=ds, DZ=dz,
                                                               DKg=dkg, DVg=dvg, **part, **chunk)
        else:
            ds, dz = ds.sum(1), dz.sum(1)
            grid, apply = (triton.cdiv(n, cfg['apply_bwd']['BLOCK_N']), bh), dict(**sizes, **cfg['apply_bwd'])
            _apply_bwd_dq_kernel[grid](DO=do, Out=out, DEN=den, S=s, Z=z, DQ=dq, **apply)
            _apply_bwd_dkdv_kernel[grid](K=k, V=v, DS=ds, DZ=dz, DKg=dkg, DVg=dvg, **apply)
        b, h = ctx.shape
        return dq.view(b, h, n, dk), dkg.view(b, h, n, dk), dvg.view(b, h, n, dv), None, None


@bf16_via_fp32
def linear_attention_triton(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, eps: float) -> Tensor:
    """Linear attention on [B, H, N, D] through ``LinearAttnFn`` (arguments checked by ``linear_attention``)."""
    return LinearAttnFn.apply(q, k, v, causal, eps)
