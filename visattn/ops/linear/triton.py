"""Triton path of ``linear_attention``: kernels and the autograd.Function.

Non-causal: ``_state_kernel`` sums ``S = Σ_n k_n v_nᵀ`` and ``z = Σ_n k_n`` (split over N across programs,
float32 atomic adds), then ``_apply_fwd_kernel`` writes ``out = q S / (q·z + eps)`` block by block. Causal:
``_causal_fwd_kernel`` walks the chunks of one (batch, head) in order, the masked q kᵀ product inside a chunk
plus the running state of the chunks before it. The backward mirrors both: for the non-causal case the same
state kernel sums ``dS = Σ q dnumᵀ``, ``dz = Σ q dden`` and ``_apply_bwd_kernel`` writes dq, dk, dv; for the
causal case one forward walk writes dq and one reverse walk writes dk, dv. All products accumulate in float32;
the normaliser ``den = q·z + eps`` is saved per query.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._dispatch import bf16_via_fp32, interpret_mode, tile_rows
from .._triton_utils import load_rows, store_rows


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
def _state_kernel(
        A, B, Out, DEN, S, Z, N, DA, DB, ROWS_PER_PROG,
        BWD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
):
    # forward (A = k, B = v): S += Aᵀ B, Z += Σ A; backward (A = q, B = do): S += Aᵀ dnum, Z += Aᵀ dden
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    da = tl.arange(0, BLOCK_DA)
    db = tl.arange(0, BLOCK_DB)
    s = tl.zeros([BLOCK_DA, BLOCK_DB], tl.float32)
    z = tl.zeros([BLOCK_DA], tl.float32)
    lo = split * ROWS_PER_PROG
    for start in range(lo, lo + ROWS_PER_PROG, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        a = _load_rows(A, bh * N * DA, rows, da, N, DA)
        if BWD:
            b, w = _grads_of_normalised(B, Out, DEN, bh, rows, db, N, DB)
            z += tl.sum(a * w[:, None], 0)
        else:
            b = _load_rows(B, bh * N * DB, rows, db, N, DB)
            z += tl.sum(a, 0)
        s += tl.dot(tl.trans(a), b)
    tl.atomic_add(S + bh * BLOCK_DA * BLOCK_DB + da[:, None] * BLOCK_DB + db[None, :], s)
    tl.atomic_add(Z + bh * BLOCK_DA + da, z)


@triton.jit
def _apply_fwd_kernel(
        Q, S, Z, Out, DEN, N, DK, DV, eps,
        BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    q = _load_rows(Q, bh * N * DK, rows, dk, N, DK)
    s = tl.load(S + bh * BLOCK_DK * BLOCK_DV + dk[:, None] * BLOCK_DV + dv[None, :])
    z = tl.load(Z + bh * BLOCK_DK + dk)
    den = tl.sum(q * z[None, :], 1) + eps
    _store_rows(Out, bh * N * DV, rows, dv, N, DV, tl.dot(q, s) / den[:, None])
    tl.store(DEN + bh * N + rows, den, mask=rows < N)


@triton.jit
def _apply_bwd_kernel(
        K, V, DO, Out, DEN, S, Z, DS, DZ, DQ, DKg, DVg, N, DK, DV,
        BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # dq = dnum Sᵀ + dden zᵀ, dk = v dSᵀ + dz, dv = k dS
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    state = bh * BLOCK_DK * BLOCK_DV + dk[:, None] * BLOCK_DV + dv[None, :]
    s = tl.load(S + state)
    ds = tl.load(DS + state)
    z = tl.load(Z + bh * BLOCK_DK + dk)
    dz = tl.load(DZ + bh * BLOCK_DK + dk)
    dnum, dden = _grads_of_normalised(DO, Out, DEN, bh, rows, dv, N, DV)
    k = _load_rows(K, bh * N * DK, rows, dk, N, DK)
    v = _load_rows(V, bh * N * DV, rows, dv, N, DV)
    _store_rows(DQ, bh * N * DK, rows, dk, N, DK, tl.dot(dnum, tl.trans(s)) + dden[:, None] * z[None, :])
    _store_rows(DKg, bh * N * DK, rows, dk, N, DK, tl.dot(v, tl.trans(ds)) + dz[None, :])
    _store_rows(DVg, bh * N * DV, rows, dv, N, DV, tl.dot(k, ds))


@triton.jit
def _causal_fwd_kernel(
        Q, K, V, Out, DEN, N, DK, DV, eps,
        BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    s = tl.zeros([BLOCK_DK, BLOCK_DV], tl.float32)
    z = tl.zeros([BLOCK_DK], tl.float32)
    for start in range(0, N, BLOCK_N):
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
def _causal_bwd_dq_kernel(
        K, V, DO, Out, DEN, DQ, N, DK, DV,
        BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # dq_i = dnum_i S_prevᵀ + dden_i z_prev + Σ_{j in chunk, j <= i} (dnum_i·v_j + dden_i) k_j
    bh = tl.program_id(0).to(tl.int64)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    s = tl.zeros([BLOCK_DK, BLOCK_DV], tl.float32)
    z = tl.zeros([BLOCK_DK], tl.float32)
    for start in range(0, N, BLOCK_N):
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
def _causal_bwd_dkdv_kernel(
        Q, K, V, DO, Out, DEN, DKg, DVg, N, DK, DV,
        BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # reverse walk with dS = Σ_{later i} q_i dnum_iᵀ, dz = Σ_{later i} dden_i q_i:
    # dk_j = dS v_j + dz + Σ_{i in chunk, i >= j} dA_ij q_i, dv_j = dSᵀ k_j + Σ_{i in chunk, i >= j} A_ij dnum_i
    bh = tl.program_id(0).to(tl.int64)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    ds = tl.zeros([BLOCK_DK, BLOCK_DV], tl.float32)
    dz = tl.zeros([BLOCK_DK], tl.float32)
    n_chunks = tl.cdiv(N, BLOCK_N)
    for c in range(0, n_chunks):
        rows = (n_chunks - 1 - c) * BLOCK_N + tl.arange(0, BLOCK_N)
        q = _load_rows(Q, bh * N * DK, rows, dk, N, DK)
        k = _load_rows(K, bh * N * DK, rows, dk, N, DK)
        v = _load_rows(V, bh * N * DV, rows, dv, N, DV)
        dnum, dden = _grads_of_normalised(DO, Out, DEN, bh, rows, dv, N, DV)
        causal = rows[:, None] >= rows[None, :]
        a = tl.where(causal, tl.dot(q, tl.trans(k)), 0.0)
        da = tl.where(causal, tl.dot(dnum, tl.trans(v)) + dden[:, None], 0.0)
        _store_rows(DKg, bh * N * DK, rows, dk, N, DK, tl.dot(v, tl.trans(ds)) + dz[None, :] + tl.dot(tl.trans(da), q))
        _store_rows(DVg, bh * N * DV, rows, dv, N, DV, tl.dot(k, ds) + tl.dot(tl.trans(a), dnum))
        ds += tl.dot(tl.trans(q), dnum)
        dz += tl.sum(q * dden[:, None], 0)


def _cfg(n: int, dk: int, dv: int) -> dict:
    block_dk, block_dv = max(16, triton.next_power_of_2(dk)), max(16, triton.next_power_of_2(dv))
    # the kernels compute in float32 whatever the input dtype: 4-byte tiles
    block_n = max(16, min(triton.next_power_of_2(n), 64)) if interpret_mode() else tile_rows(block_dk, block_dv, 4)
    return dict(BLOCK_N=block_n, BLOCK_DK=block_dk, BLOCK_DV=block_dv)


def _num_splits(n: int, bh: int, block_n: int) -> int:
    """Programs that share the N axis of one state sum, so that (batch, head) pairs alone need not fill a GPU
    (one in the interpreter)."""
    return 1 if interpret_mode() else max(1, min(triton.cdiv(n, 4 * block_n), triton.cdiv(264, bh)))


def _state(a: Tensor, b: Tensor, out: Tensor | None, den: Tensor | None, cfg: dict) -> tuple[Tensor, Tensor]:
    """``(Σ_n a_n b_nᵀ, Σ_n a_n)`` (forward) or ``(Σ q dnumᵀ, Σ q dden)`` (backward, ``out`` given): float32,
    padded to the blocks."""
    bh, n, da = a.shape
    block_a, block_b = cfg['BLOCK_DK'], cfg['BLOCK_DV']
    s = torch.zeros(bh, block_a, block_b, device=a.device, dtype=torch.float32)
    z = torch.zeros(bh, block_a, device=a.device, dtype=torch.float32)
    splits = _num_splits(n, bh, cfg['BLOCK_N'])
    rows = triton.cdiv(triton.cdiv(n, splits), cfg['BLOCK_N']) * cfg['BLOCK_N']
    bwd = out is not None
    _state_kernel[(bh, triton.cdiv(n, rows))](
        A=a, B=b, Out=out if bwd else b, DEN=den if bwd else z, S=s, Z=z, N=n, DA=da, DB=b.shape[-1],
        ROWS_PER_PROG=rows, BWD=bwd, BLOCK_N=cfg['BLOCK_N'], BLOCK_DA=block_a, BLOCK_DB=block_b)
    return s, z


class LinearAttnFn(torch.autograd.Function):
    """Normalised linear attention on feature-mapped q, k (see the module docstring); forward and backward."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, causal: bool, eps: float) -> Tensor:
        b, h, n, dk = q.shape
        dv = v.shape[-1]
        # [B, H, N, D] -> [B·H, N, D]
        q, k, v = (t.contiguous().view(b * h, n, t.shape[-1]) for t in (q, k, v))
        cfg = _cfg(n, dk, dv)
        out = torch.empty_like(v)
        den = torch.empty(b * h, n, device=q.device, dtype=torch.float32)
        if causal:
            _causal_fwd_kernel[(b * h,)](Q=q, K=k, V=v, Out=out, DEN=den, N=n, DK=dk, DV=dv, eps=eps, **cfg)
            s = z = None
        else:
            s, z = _state(k, v, None, None, cfg)
            grid = (triton.cdiv(n, cfg['BLOCK_N']), b * h)
            _apply_fwd_kernel[grid](Q=q, S=s, Z=z, Out=out, DEN=den, N=n, DK=dk, DV=dv, eps=eps, **cfg)
        ctx.save_for_backward(q, k, v, out, den, s, z)
        ctx.causal, ctx.cfg, ctx.shape = causal, cfg, (b, h)
        return out.view(b, h, n, dv)

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, out, den, s, z = ctx.saved_tensors
        bh, n, dk = q.shape
        dv = v.shape[-1]
        cfg = ctx.cfg
        do = grad.contiguous().view(bh, n, dv)
        dq, dkg, dvg = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = dict(DO=do, Out=out, DEN=den, N=n, DK=dk, DV=dv, **cfg)
        if ctx.causal:
            _causal_bwd_dq_kernel[(bh,)](K=k, V=v, DQ=dq, **common)
            _causal_bwd_dkdv_kernel[(bh,)](Q=q, K=k, V=v, DKg=dkg, DVg=dvg, **common)
        else:
            ds, dz = _state(q, do, out, den, cfg)
            grid = (triton.cdiv(n, cfg['BLOCK_N']), bh)
            _apply_bwd_kernel[grid](K=k, V=v, S=s, Z=z, DS=ds, DZ=dz, DQ=dq, DKg=dkg, DVg=dvg, **common)
        b, h = ctx.shape
        return dq.view(b, h, n, dk), dkg.view(b, h, n, dk), dvg.view(b, h, n, dv), None, None


@bf16_via_fp32
def linear_attention_triton(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, eps: float) -> Tensor:
    """Linear attention on [B, H, N, D] through ``LinearAttnFn`` (arguments checked by ``linear_attention``)."""
    return LinearAttnFn.apply(q, k, v, causal, eps)
