"""Registers, register spills and shared memory of every visattn Triton kernel on a Hopper GPU (sm_90), compiled
offline: Triton's front end, LLVM and ptxas run on the CPU, no GPU needed.

    python benchmarks/kernel_resources.py                # the table on stdout
    python benchmarks/kernel_resources.py --out benchmarks/results/sm90_kernel_resources.md
    python benchmarks/kernel_resources.py --check        # exit 1 if a kernel fails to compile, needs more shared
                                                         # memory than an H100 block has, or spills registers
                                                         # (other than the spills listed in KNOWN_SPILLS)

Each kernel is compiled at the launch settings (tile sizes and warps) that its op chooses for the shapes of
``bench_ops.py`` and for common head widths, in bfloat16, float16 and float32, with pointers declared 16-byte
aligned as the runtime finds torch's allocations (so the vector loads, asynchronous copies and shared memory are
the GPU's). ``ptxas -v`` gives the registers a thread uses and the bytes it spills to local memory: a kernel at
255 registers that spills inside its main loop pays a round trip to local memory per step, the first thing to
rule out before timing. The MMA column says whether the tile products run as Hopper's ``wgmma`` or as ``mma.sync``.

These are static figures, not timings: ``bench_ops.py`` on a GPU gives those.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

os.environ.pop('TRITON_INTERPRET', None)  # the GPU's launch settings, not the interpreter's

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from visattn.ops.channel_gate import triton as gate  # noqa: E402
from visattn.ops.criss_cross import triton as cc  # noqa: E402
from visattn.ops.halo import PAD_MODES  # noqa: E402
from visattn.ops.halo import triton as halo  # noqa: E402
from visattn.ops.linear import triton as linear  # noqa: E402
from visattn.ops.local1d import triton as local  # noqa: E402
from visattn.ops.neighborhood import triton as na  # noqa: E402

SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on an H100
FP32_POINTERS = {'LSE', 'DELTA', 'DEN', 'S', 'Z', 'DS', 'DZ', 'DRPB', 'SUM', 'MAX', 'AVG', 'LOGIT', 'DAVG', 'DMAX',
                 'MAXV', 'W1', 'B1', 'W2', 'B2', 'LSE_ROW', 'DREL'}
DATA_POINTERS = {'Q', 'K', 'V', 'Out', 'DO', 'DQ', 'DKg', 'DVg', 'RPB', 'REL', 'A', 'B', 'X', 'Y', 'DY', 'DX'}
FLOATS = {'scale', 'eps'}
DTYPES = {'bf16': 2, 'fp16': 2, 'fp32': 4}
_FP32_ONLY = 'float32 only: 16-bit inputs are clean'
_HALO_B12 = 'float32 with every Triton; bf16/fp16 (72-88 B) with Triton 3.8 only, clean with Triton 3.9'
# Spills known and left, (op, kernel, shape) -> (dtypes, why); ``--check`` fails on any other.
KNOWN_SPILLS = {
    ('linear', 'chunk_bwd_dkdv', 'N=4096 d=128'): ({'fp32'}, _FP32_ONLY + ' (the dk part, on Dk slices of the state)'),
    ('halo', 'halo_bwd_dq', 'b=8 h=3 s=2 r=2 d=32 zeros'): ({'fp32'}, _FP32_ONLY),
    ('halo', 'halo_bwd_dq', 'b=8 h=3 s=2 r=2 d=32 mask'): ({'fp32'}, _FP32_ONLY),
    ('halo', 'halo_bwd_dq', 'b=8 h=3 s=2 r=1 d=32 zeros'): ({'fp32'}, _FP32_ONLY + " (rel_stride=1, compat='timm')"),
    ('halo', 'halo_bwd_dq', 'b=8 h=3 s=2 r=1 d=32 mask'): ({'fp32'}, _FP32_ONLY + " (rel_stride=1, compat='timm')"),
    ('halo', 'halo_bwd_dq', 'b=12 h=2 s=1 r=1 d=64 mask'): ({'fp32'}, _FP32_ONLY),
    ('halo', 'halo_bwd_dkdv', 'b=12 h=2 s=1 r=1 d=64 zeros'): ({'fp32', 'bf16', 'fp16'}, _HALO_B12),
    ('halo', 'halo_bwd_dkdv', 'b=12 h=2 s=1 r=1 d=64 mask'): ({'fp32', 'bf16', 'fp16'}, _HALO_B12),
    ('local1d', 'local_bwd_dkdv', 'N=4096 d=64'): (
        {'fp32'}, _FP32_ONLY + ' (S and dP formed in the dq kernel\'s [queries, keys] orientation, so that the two '
        'kernels agree bit for bit at large logits)'),
}


@dataclass
class Launch:
    """One kernel at one op's launch settings: ``cfg`` holds its constexprs (and more) and ``num_warps``."""

    op: str
    shape: str
    fn: object
    cfg: dict
    dtype: str


@dataclass
class Resources:
    regs: int
    spill_stores: int
    spill_loads: int
    shared: int
    warps: int
    mma: str


def launches() -> Iterator[Launch]:
    """Every kernel at the settings its op picks for the benchmark shapes (and other common head widths)."""
    for dtype, size in DTYPES.items():
        for d in (64, 128):  # bench_ops: B = 8, H = 8, N = 4096, heads of 64
            shape = f'N=4096 d={d}'
            cfg = linear._cfg(4096, d, d)
            tiles = cfg['tiles']
            for bwd in (False, True):
                yield Launch('linear', shape, linear._state_kernel,
                             dict(BWD=bwd, BLOCK_DA=tiles['BLOCK_DK'], BLOCK_DB=tiles['BLOCK_DV'], **cfg['state']),
                             dtype)
            families = (('apply_fwd', (linear._apply_fwd_kernel,)),
                        ('apply_bwd', (linear._apply_bwd_dq_kernel, linear._apply_bwd_dkdv_kernel)),
                        ('chunk', (linear._chunk_fwd_kernel,)))
            for family, fns in families:
                for fn in fns:
                    yield Launch('linear', shape, fn, dict(tiles, **cfg[family]), dtype)
            (_, dq), *dkdv = linear._causal_bwd_parts(cfg)
            yield Launch('linear', shape, linear._chunk_bwd_dq_kernel, dict(tiles, **cfg['chunk'], **dq), dtype)
            for _, part in dkdv:
                yield Launch('linear', shape, linear._chunk_bwd_dkdv_kernel, dict(tiles, **cfg['chunk'], **part),
                             dtype)
            fwd, bwd = local._configs(d, d, size)
            for fn, c in ((local._local_fwd_kernel, fwd), (local._local_bwd_dq_kernel, bwd),
                          (local._local_bwd_dkdv_kernel, bwd)):
                yield Launch('local1d', shape, fn, c, dtype)
        # CCNet at [2, 512, 97, 97]: q, k of 64 channels, v of 512, lines of 97
        for column in (False, True):
            cfgs = cc._kernel_cfgs(cc.blocks(97, 64, 512, size), size)
            for fn, role in ((cc._cc_fwd_kernel, 'fwd'), (cc._cc_bwd_stats_kernel, 'dqdk'),
                             (cc._cc_bwd_dq_kernel, 'dqdk'), (cc._cc_bwd_dk_kernel, 'dqdk'),
                             (cc._cc_bwd_dv_kernel, 'dv')):
                yield Launch('criss_cross', f'97×97 {"column" if column else "row"}', fn,
                             dict(cfgs[role], COLUMN=column), dtype)
        for d, dilation, has_rpb in ((32, 1, True), (64, 2, False)):  # NAT's heads, 7×7 windows on 56×56
            th, tw, block_n = na._tiles(56, 56, 7, d, d, size)
            c = dict(DK=d, DV=d, KS=7, DIL=dilation, HAS_RPB=has_rpb, TILE_H=th, TILE_W=tw, BLOCK_N=block_n,
                     BLOCK_DK=d, BLOCK_DV=d)
            for fn in (na._na_fwd_kernel, na._na_bwd_dq_kernel, na._na_bwd_dkdv_kernel):
                yield Launch('neighborhood', f'7×7 d={d} dil={dilation}', fn, c, dtype)
        # HaloNet's blocks; r = rel_stride: s (the default) and, for s > 1, 1 (HaloAttn(compat='timm')); both pad
        # modes (REL_STRIDE and PAD_ZEROS are constexprs: each value is its own kernel)
        for block, halo_size, stride, rel, d in ((8, 3, 1, True, 16), (8, 3, 2, True, 32), (12, 2, 1, False, 64)):
            for rel_stride in sorted({stride, 1}, reverse=True):
                for pad_mode in PAD_MODES:
                    c = dict(HAS_REL=rel, **halo._config(d, d, size, block, halo_size, stride, rel_stride, pad_mode))
                    shape = f'b={block} h={halo_size} s={stride} r={rel_stride} d={d} {pad_mode}'
                    for fn in (halo._halo_fwd_kernel, halo._halo_bwd_dq_kernel, halo._halo_bwd_dkdv_kernel):
                        yield Launch('halo', shape, fn, c, dtype)
        shape = '[32, 256, 56, 56]'  # the channel gate's benchmark shape, SE with r = 16
        rows = gate._blocks(32 * 256, 56 * 56)
        for has_y, want_max in ((False, True), (True, False)):
            yield Launch('channel_gate', shape, gate._row_reduce_kernel, dict(HAS_Y=has_y, WANT_MAX=want_max, **rows),
                         dtype)
        for eca, use_max, act in ((False, True, 0), (False, False, 2), (True, False, 0)):
            c = dict(ECA=eca, USE_AVG=True, USE_MAX=use_max, HAS_B1=True, HAS_B2=True, ACT=act, KS=5 if eca else 1,
                     **gate._excite_blocks(256, 16))
            yield Launch('channel_gate', shape, gate._excite_mul_kernel, c, dtype)
        yield Launch('channel_gate', shape, gate._gate_bwd_kernel, dict(HAS_MAX=True, **rows), dtype)


def _signature(fn, consts: dict, dtype: str) -> dict:
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


def _ptxas() -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(90).path


def compile_launch(launch: Launch, arch: int = 90) -> Resources:
    """Compile one launch for ``sm_<arch>``; its resources from ``ptxas -v`` and Triton's metadata."""
    fn = launch.fn
    wanted = [p.name for p in fn.params if p.is_constexpr]
    missing = [name for name in wanted if name not in launch.cfg]
    if missing:
        raise KeyError(f'{fn.__name__}: no value for the constexprs {missing}')
    consts = {name: launch.cfg[name] for name in wanted}
    sig = _signature(fn, consts, launch.dtype)
    aligned = {(fn.arg_names.index(n),): [['tt.divisibility', 16]] for n, t in sig.items() if t[0] == '*'}
    options = {key: launch.cfg[key] for key in ('num_warps', 'num_stages') if key in launch.cfg}
    kernel = triton.compile(ASTSource(fn, sig, consts, attrs=aligned), target=GPUTarget('cuda', arch, 32),
                            options=options)
    ptx = kernel.asm['ptx']
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / 'kernel.ptx'
        src.write_text(ptx)
        log = subprocess.run([_ptxas(), '-v', '--regAllocOptLevel=2', f'--gpu-name=sm_{arch}a', str(src), '-o',
                              str(Path(tmp) / 'kernel.cubin')], capture_output=True, text=True, check=True).stderr

    def number(pattern: str) -> int:
        return int(re.search(pattern, log).group(1))

    mma = 'wgmma' if 'wgmma.mma_async' in ptx else 'mma.sync' if 'mma.sync' in ptx else '-'
    return Resources(number(r'Used (\d+) registers'), number(r'(\d+) bytes spill stores'),
                     number(r'(\d+) bytes spill loads'), kernel.metadata.shared, kernel.metadata.num_warps, mma)


def _tiles(cfg: dict) -> str:
    keys = [k for k in cfg if k.startswith(('BLOCK', 'TILE'))]
    return ' '.join(f'{k.removeprefix("BLOCK_").removeprefix("TILE_").lower()}={cfg[k]}' for k in keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', type=Path, help='also write the table (markdown) here')
    parser.add_argument('--check', action='store_true',
                        help='exit 1 on a compile failure, too much shared memory or any register spill')
    parser.add_argument('--arch', type=int, default=90, help='compute capability to compile for (default 90)')
    args = parser.parse_args(argv)
    rows = ['| op | shape | kernel | dtype | tiles | warps | registers | spill stores / loads (B) | shared (KiB) '
            '| MMA |', '|---|---|---|---|---|---|---|---|---|---|']
    problems, known = [], set()
    for launch in launches():
        name = launch.fn.__name__.strip('_').removesuffix('_kernel')
        try:
            r = compile_launch(launch, args.arch)
        except Exception as e:  # noqa: BLE001  report every kernel, then fail
            problems.append(f'{launch.op} {name} {launch.dtype}: {type(e).__name__}: {str(e)[:2000]}')
            rows.append(f'| {launch.op} | {launch.shape} | {name} | {launch.dtype} | {_tiles(launch.cfg)} '
                        f'| | failed | | | |')
            continue
        if r.shared > SHARED_LIMIT:
            problems.append(f'{launch.op} {name} {launch.dtype}: {r.shared} B of shared memory')
        known_dtypes, why = KNOWN_SPILLS.get((launch.op, name, launch.shape), (set(), ''))
        if (r.spill_stores or r.spill_loads) and launch.dtype in known_dtypes:
            known.add(f'{launch.op} {name} ({launch.shape}, {", ".join(sorted(known_dtypes))}): {why}')
        elif r.spill_stores or r.spill_loads:
            problems.append(f'{launch.op} {name} {launch.dtype} ({launch.shape}): spills '
                            f'{r.spill_stores} / {r.spill_loads} B')
        rows.append(f'| {launch.op} | {launch.shape} | {name} | {launch.dtype} | {_tiles(launch.cfg)} | {r.warps} '
                    f'| {r.regs} | {r.spill_stores} / {r.spill_loads} | {r.shared / 1024:.1f} | {r.mma} |')
        print(rows[-1], flush=True)
    table = '\n'.join(rows)
    if args.out:
        header = (f'# visattn Triton kernels compiled offline for sm_{args.arch}\n\n'
                  f'`python benchmarks/kernel_resources.py --out {args.out}` (Triton {triton.__version__}). '
                  'Registers per thread and spilled bytes from `ptxas -v`; shared memory per block from Triton. '
                  'Static figures, not timings.\n\n')
        notes = ['## Known spills\n', *(f'- {k}' for k in sorted(known))] if known else []
        if problems:
            notes += ['\n## Problems\n', *(f'- {p}' for p in problems)]
        args.out.write_text(header + table + '\n\n' + '\n'.join(notes) + '\n')
    for k in sorted(known):
        print('KNOWN', k)
    for p in problems:
        print('PROBLEM', p)
    return 1 if args.check and problems else 0


if __name__ == '__main__':
    sys.exit(main())
