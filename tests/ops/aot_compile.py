"""Compile every Triton kernel of visattn.ops for a Hopper GPU (sm_90) without one: Triton's front end, the
LLVM back end and ptxas run offline, so a kernel that the interpreter accepts but the compiler rejects fails here.
Pointers are declared 16-byte aligned, as the runtime finds them, so that the shared memory checked is the real one.

    python tests/ops/aot_compile.py        # prints one line per kernel, exits 1 if any fails

Run by ``tests/ops/test_compile.py`` (marked slow) in a process without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import os
import sys

os.environ.pop('TRITON_INTERPRET', None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from visattn.ops.channel_gate import triton as gate  # noqa: E402
from visattn.ops.criss_cross import triton as cc  # noqa: E402
from visattn.ops.halo import triton as halo  # noqa: E402
from visattn.ops.linear import triton as linear  # noqa: E402
from visattn.ops.local1d import triton as local  # noqa: E402
from visattn.ops.neighborhood import triton as na  # noqa: E402

FP32_POINTERS = {'LSE', 'DELTA', 'DEN', 'S', 'Z', 'DS', 'DZ', 'DK_ACC', 'DV_ACC', 'DRPB', 'SUM', 'MAX', 'AVG',
                 'LOGIT', 'DAVG', 'DMAX', 'MAXV', 'W1', 'B1', 'W2', 'B2', 'LSE_ROW', 'DREL'}
DATA_POINTERS = {'Q', 'K', 'V', 'Out', 'DO', 'DQ', 'DKg', 'DVg', 'RPB', 'REL', 'A', 'B', 'X', 'Y', 'DY', 'DX'}
FLOATS = {'scale', 'eps'}


def signature(fn, consts: dict, dtype: str) -> dict:
    """Triton signature: data pointers in ``dtype``, float32 pointers for the statistics, fp32 scalars, i32 rest."""
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            continue
        if name in DATA_POINTERS:
            sig[name] = '*' + dtype
        elif name in FP32_POINTERS:
            sig[name] = '*fp32'
        else:
            sig[name] = 'fp32' if name in FLOATS else 'i32'
    return sig


def cases():
    for dtype in ('bf16', 'fp16', 'fp32'):
        size = {'bf16': 2, 'fp16': 2, 'fp32': 4}[dtype]
        for d in (64, 128):
            block = triton.next_power_of_2(d)
            tile = dict(BLOCK_DK=block, BLOCK_DV=block)
            rows = local.tile_rows(block, block, size)
            for fn in (local._local_fwd_kernel, local._local_bwd_dq_kernel, local._local_bwd_dkdv_kernel):
                yield fn, dict(BLOCK_M=rows, BLOCK_N=rows, **tile), dtype
            rows = linear.tile_rows(block, block, 4)
            for fn in (linear._apply_fwd_kernel, linear._apply_bwd_kernel, linear._chunk_fwd_kernel,
                       linear._chunk_bwd_dq_kernel, linear._chunk_bwd_dkdv_kernel):
                yield fn, dict(BLOCK_N=rows, **tile), dtype
            for bwd in (False, True):
                yield linear._state_kernel, dict(BWD=bwd, BLOCK_N=rows, BLOCK_DA=block, BLOCK_DB=block), dtype
        for column in (False, True):  # CCNet's heads: q, k of 64 channels, v of 512, rows and columns of 97
            for fn in (cc._cc_fwd_kernel, cc._cc_bwd_dq_kernel, cc._cc_bwd_dk_kernel, cc._cc_bwd_dv_kernel):
                yield fn, dict(COLUMN=column, **cc.blocks(97, 64, 512, size)), dtype
        for d, dilation, has_rpb in ((32, 1, True), (64, 2, False)):  # NAT's heads, 7×7 windows on a 56×56 map
            th, tw, block_n = na._tiles(56, 56, 7, d, d, size)
            consts = dict(DK=d, DV=d, KS=7, DIL=dilation, HAS_RPB=has_rpb, TILE_H=th, TILE_W=tw, BLOCK_N=block_n,
                          BLOCK_DK=d, BLOCK_DV=d)
            for fn in (na._na_fwd_kernel, na._na_bwd_dq_kernel, na._na_bwd_dkdv_kernel):
                yield fn, consts, dtype
        for has_y, want_max in ((False, True), (True, False)):
            yield gate._row_reduce_kernel, dict(HAS_Y=has_y, WANT_MAX=want_max, BLOCK_R=4, BLOCK_HW=1024), dtype
        for eca, use_max, act in ((False, True, 0), (False, False, 2), (True, False, 0)):
            yield gate._excite_mul_kernel, dict(
                ECA=eca, USE_AVG=True, USE_MAX=use_max, HAS_B1=True, HAS_B2=True, ACT=act, KS=5 if eca else 1,
                BLOCK_C=8, BLOCK_HW=512, BLOCK_K=64, BLOCK_CR=16), dtype
        yield gate._gate_bwd_kernel, dict(HAS_MAX=True, BLOCK_R=4, BLOCK_HW=1024), dtype
        for bs, hs, stride, rel, dk in ((8, 3, 1, True, 16), (8, 3, 2, True, 32), (12, 2, 1, False, 64)):
            consts = dict(HAS_REL=rel, **halo._config(dk, dk, size, bs, hs, stride))
            for fn in (halo._halo_fwd_kernel, halo._halo_bwd_dq_kernel, halo._halo_bwd_dkdv_kernel):
                yield fn, consts, dtype


def main() -> int:
    target = GPUTarget('cuda', 90, 32)
    failed = 0
    for fn, consts, dtype in cases():
        name = f'{fn.__name__} {dtype} {consts}'
        try:
            sig = signature(fn, consts, dtype)
            # pointers 16-byte aligned, as the runtime specialises them for torch's allocations: vector loads,
            # asynchronous copies and the shared memory they take, as on the GPU
            aligned = {(fn.arg_names.index(n),): [['tt.divisibility', 16]] for n, t in sig.items() if t[0] == '*'}
            kernel = triton.compile(ASTSource(fn, sig, consts, attrs=aligned), target=target)
            shared = kernel.metadata.shared
            if shared > 227 * 1024:
                raise RuntimeError(f'needs {shared} bytes of shared memory, more than an H100 block has')
            print(f'ok    {name}: {shared} B shared')
        except Exception as e:  # noqa: BLE001  report every kernel, then fail
            failed += 1
            print(f'FAIL  {name}: {type(e).__name__}: {str(e)[:2000]}')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
