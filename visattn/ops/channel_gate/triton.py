"""Triton path of ``channel_gate`` / ``eca_gate``: kernels and the autograd.Function.

Forward, two kernels and two passes over the map: ``_row_reduce_kernel`` pools every (batch, channel) row
(sum and max in one read); ``_excite_mul_kernel`` recomputes, per program, the excitation of its channels from
the pooled vectors (SE/CBAM's MLP or ECA's 1-D conv: a few thousand FLOPs) and writes ``x · σ(logit)``,
visiting the samples in reverse so that its read of ``x`` finds the last-pooled samples still in the L2 cache.
Backward, two passes: ``_row_reduce_kernel`` sums ``dy·x`` per row (the gate's gradient), the excitation is
differentiated in PyTorch, and ``_gate_bwd_kernel`` writes ``dx = dy·σ + d(avg)/HW + d(max)·[x = max]``
in one pass. Pooling, gates and sums run in float32. Expects NCHW-contiguous maps (others are copied).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._dispatch import bf16_via_fp32, interpret_mode
from .naive import excite_backward, excite_fn


@triton.jit
def _row_reduce_kernel(
        X, Y, SUM, MAX, ROWS, HW,
        HAS_Y: tl.constexpr, WANT_MAX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # per row r: SUM[r] = Σ x (or Σ x·y with HAS_Y), MAX[r] = max x
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < ROWS
    base = rows.to(tl.int64)[:, None] * HW
    acc = tl.zeros([BLOCK_R, BLOCK_HW], tl.float32)
    mx = tl.full([BLOCK_R, BLOCK_HW], float('-inf'), tl.float32)
    for start in range(0, HW, BLOCK_HW):
        cols = start + tl.arange(0, BLOCK_HW)
        mask = rmask[:, None] & (cols[None, :] < HW)
        x = tl.load(X + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_Y:
            acc += x * tl.load(Y + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        else:
            acc += x
        if WANT_MAX:
            mx = tl.maximum(mx, tl.where(mask, x, float('-inf')))
    tl.store(SUM + rows, tl.sum(acc, 1), mask=rmask)
    if WANT_MAX:
        tl.store(MAX + rows, tl.max(mx, 1), mask=rmask)


@triton.jit
def _act(h, ACT: tl.constexpr):
    if ACT == 0:
        h = tl.maximum(h, 0.0)
    elif ACT == 1:
        h = h * tl.sigmoid(h)
    else:
        h = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    return h


@triton.jit
def _mlp_logit(POOL, W1, B1, W2, B2, b, chans, C, CR,
               HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, ACT: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_CR: tl.constexpr):
    # fc2(act(fc1(pool[b]))) for the output channels ``chans``
    cr = tl.arange(0, BLOCK_CR)
    hidden = tl.zeros([BLOCK_CR], tl.float32)
    for k0 in range(0, C, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        p = tl.load(POOL + b * C + kk, mask=kk < C, other=0.0)
        w1 = tl.load(W1 + cr[:, None] * C + kk[None, :], mask=(cr[:, None] < CR) & (kk[None, :] < C), other=0.0)
        hidden += tl.sum(w1.to(tl.float32) * p[None, :], 1)
    if HAS_B1:
        hidden += tl.load(B1 + cr, mask=cr < CR, other=0.0).to(tl.float32)
    hidden = tl.where(cr < CR, _act(hidden, ACT), 0.0)
    w2 = tl.load(W2 + chans[:, None] * CR + cr[None, :], mask=(chans[:, None] < C) & (cr[None, :] < CR), other=0.0)
    logit = tl.sum(w2.to(tl.float32) * hidden[None, :], 1)
    if HAS_B2:
        logit += tl.load(B2 + chans, mask=chans < C, other=0.0).to(tl.float32)
    return logit


@triton.jit
def _excite_mul_kernel(
        X, AVG, MAX, W1, B1, W2, B2, Y, NB, C, CR, HW,
        ECA: tl.constexpr, USE_AVG: tl.constexpr, USE_MAX: tl.constexpr, HAS_B1: tl.constexpr,
        HAS_B2: tl.constexpr, ACT: tl.constexpr, KS: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CR: tl.constexpr,
):
    # one program: the gates of BLOCK_C channels of one sample (excitation recomputed from the pooled vectors,
    # a few thousand FLOPs), then y = x·σ(gate) over the whole map. Samples run last-pooled first, so that the
    # second read of x hits the L2 cache the pooling pass left warm.
    b = (NB - 1 - tl.program_id(1)).to(tl.int64)
    chans = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = chans < C
    logit = tl.zeros([BLOCK_C], tl.float32)
    if ECA:
        for j in tl.static_range(KS):
            src = chans + j - (KS - 1) // 2
            tap = tl.load(AVG + b * C + src, mask=(src >= 0) & (src < C), other=0.0)
            logit += tl.load(W1 + j).to(tl.float32) * tap
    else:
        if USE_AVG:
            logit += _mlp_logit(AVG, W1, B1, W2, B2, b, chans, C, CR, HAS_B1, HAS_B2, ACT, BLOCK_K, BLOCK_CR)
        if USE_MAX:
            logit += _mlp_logit(MAX, W1, B1, W2, B2, b, chans, C, CR, HAS_B1, HAS_B2, ACT, BLOCK_K, BLOCK_CR)
    gate = tl.sigmoid(logit)
    base = (b * C + chans)[:, None] * HW
    for start in range(0, HW, BLOCK_HW):
        cols = start + tl.arange(0, BLOCK_HW)
        mask = cmask[:, None] & (cols[None, :] < HW)
        x = tl.load(X + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + base + cols[None, :], (x * gate[:, None]).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gate_bwd_kernel(
        X, DY, LOGIT, DAVG, DMAX, MAXV, DX, ROWS, HW,
        HAS_MAX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # dx = dy·σ(logit) + d(avg)/HW (+ d(max) where x equals the row's maximum)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    rmask = rows < ROWS
    mask = rmask[:, None] & (cols[None, :] < HW)
    offs = rows.to(tl.int64)[:, None] * HW + cols[None, :]
    gate = tl.sigmoid(tl.load(LOGIT + rows, mask=rmask, other=0.0))
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    dx = dy * gate[:, None] + (tl.load(DAVG + rows, mask=rmask, other=0.0) / HW)[:, None]
    if HAS_MAX:
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        mx = tl.load(MAXV + rows, mask=rmask, other=0.0)
        dmax = tl.load(DMAX + rows, mask=rmask, other=0.0)
        dx += tl.where(x == mx[:, None], dmax[:, None], 0.0)
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


def _blocks(rows: int, hw: int) -> dict:
    """Tiles of the row-wise kernels (``_row_reduce_kernel``, ``_gate_bwd_kernel``): on a GPU 4 rows of up to 1024
    positions on 8 warps (on 4, the float16 dot-product reduction spills registers on sm_90); in the interpreter
    few, large programs."""
    if interpret_mode():
        return dict(BLOCK_R=min(triton.next_power_of_2(rows), 64), BLOCK_HW=min(triton.next_power_of_2(hw), 256))
    return dict(BLOCK_R=4, BLOCK_HW=min(triton.next_power_of_2(hw), 1024), num_warps=8)


def _excite_blocks(c: int, cr: int) -> dict:
    """Tile sizes of ``_excite_mul_kernel``: channels and positions per program, and the widths of the excitation's
    inputs (up to 64 channels at a time) and hidden layer."""
    tiles = dict(BLOCK_C=16, BLOCK_HW=256) if interpret_mode() else dict(BLOCK_C=8, BLOCK_HW=512)
    return dict(tiles, BLOCK_K=min(triton.next_power_of_2(c), 64), BLOCK_CR=triton.next_power_of_2(cr))


def _row_reduce(x: Tensor, y: Tensor | None, want_max: bool) -> tuple[Tensor, Tensor | None]:
    """Per-row sums (of x, or of x·y) and maxima of x [R, HW], in float32."""
    rows, hw = x.shape
    total = torch.empty(rows, device=x.device, dtype=torch.float32)
    mx = torch.empty(rows, device=x.device, dtype=torch.float32) if want_max else None
    blocks = _blocks(rows, hw)
    _row_reduce_kernel[(triton.cdiv(rows, blocks['BLOCK_R']),)](
        X=x, Y=x if y is None else y, SUM=total, MAX=total if mx is None else mx, ROWS=rows, HW=hw,
        HAS_Y=y is not None, WANT_MAX=want_max, **blocks)
    return total, mx


ACT_CODES = {'relu': 0, 'silu': 1, 'gelu': 2}


class ChannelGateFn(torch.autograd.Function):
    """``x · σ(excite(avg(x), max(x), *params))`` on [B, C, H, W]; forward and backward (see the module docstring).

    ``kind`` is ``'mlp'`` (params: fc1 weight and bias, fc2 weight and bias; SE, CBAM) or ``'eca'`` (params: the
    1-D conv weight)."""

    @staticmethod
    def forward(ctx, x: Tensor, pool: str, kind: str, act: str, *params: Tensor | None) -> Tensor:
        b, c, h, w = x.shape
        xr = x.contiguous().view(b * c, h * w)  # [B·C, HW]: one row per (sample, channel)
        use_avg, use_max = pool in ('avg', 'avgmax'), pool in ('max', 'avgmax')
        total, mx = _row_reduce(xr, None, want_max=use_max)
        avg = total / (h * w) if use_avg else None
        if kind == 'eca':
            w1, b1, w2, b2, cr = params[0].reshape(-1).contiguous(), None, None, None, 1
        else:
            w1, b1, w2, b2 = (p.reshape(p.shape[0], -1).contiguous() if p is not None else None for p in params)
            cr = w1.shape[0]
        y = torch.empty_like(xr)
        blocks = _excite_blocks(c, cr)
        _excite_mul_kernel[(triton.cdiv(c, blocks['BLOCK_C']), b)](
            X=xr, AVG=total if avg is None else avg, MAX=total if mx is None else mx, W1=w1,
            B1=total if b1 is None else b1, W2=total if w2 is None else w2, B2=total if b2 is None else b2, Y=y,
            NB=b, C=c, CR=cr, HW=h * w, ECA=kind == 'eca', USE_AVG=use_avg, USE_MAX=use_max,
            HAS_B1=b1 is not None, HAS_B2=b2 is not None, ACT=ACT_CODES[act], KS=w1.numel() if kind == 'eca' else 1,
            **blocks)
        avg = avg.view(b, c) if use_avg else None
        mx = mx.view(b, c) if use_max else None
        ctx.save_for_backward(xr, *(t if t is not None else torch.empty(0) for t in (avg, mx)), *params)
        ctx.none = (avg is None, mx is None, *(p is None for p in params))
        ctx.excite, ctx.shape = excite_fn(kind, act), (b, c, h, w)
        return y.view(b, c, h, w)

    @staticmethod
    def backward(ctx, dy: Tensor):
        xr, *rest = ctx.saved_tensors
        avg, mx, *params = (None if none else t for t, none in zip(rest, ctx.none))
        b, c, h, w = ctx.shape
        dyr = dy.contiguous().view(b * c, h * w)
        dgate, _ = _row_reduce(xr, dyr, want_max=False)  # Σ_hw dy·x per (sample, channel)
        logits, (davg, dmax, *dparams) = excite_backward(ctx.excite, avg, mx, params, dgate.view(b, c))
        logits = logits.reshape(-1).contiguous()
        zeros = logits.new_zeros(b * c)
        davg = zeros if davg is None else davg.reshape(-1).float().contiguous()
        has_max = dmax is not None
        dx = torch.empty_like(xr)
        blocks = _blocks(b * c, h * w)
        grid = (triton.cdiv(b * c, blocks['BLOCK_R']), triton.cdiv(h * w, blocks['BLOCK_HW']))
        _gate_bwd_kernel[grid](
            X=xr, DY=dyr, LOGIT=logits, DAVG=davg, DMAX=dmax.reshape(-1).float().contiguous() if has_max else zeros,
            MAXV=mx.reshape(-1).contiguous() if has_max else zeros, DX=dx, ROWS=b * c, HW=h * w, HAS_MAX=has_max,
            **blocks)
        return (dx.view(b, c, h, w), None, None, None, *dparams)


@bf16_via_fp32
def channel_gate_triton(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor,
                        fc2_bias: Tensor | None, *, pool: str, act: str) -> Tensor:
    """SE / CBAM-channel gate on [B, C, H, W] (arguments checked by ``channel_gate``)."""
    return ChannelGateFn.apply(x, pool, 'mlp', act, fc1_weight, fc1_bias, fc2_weight, fc2_bias)


@bf16_via_fp32
def eca_gate_triton(x: Tensor, conv_weight: Tensor) -> Tensor:
    """ECA gate on [B, C, H, W] (arguments checked by ``eca_gate``)."""
    return ChannelGateFn.apply(x, 'avg', 'eca', 'relu', conv_weight)
