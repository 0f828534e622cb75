"""CPU time and peak memory of every registered token mixer at N = 1K, 4K, 16K (dim 256, 8 heads, batch 1).

    python benchmarks/bench_mixers.py                    # the issue's sizes: N = 1024, 4096, 16384
    python benchmarks/bench_mixers.py --quick            # N = 128, 512, dim 64, in one process: a smoke run
    python benchmarks/bench_mixers.py --mixers full local reformer --sizes 1024 4096

What is measured, per (mixer, N), in a fresh subprocess:
    - time: median forward time (``torch.inference_mode``, fp32) of at least ``--repeats`` calls, and of as
      many as fit in ``--min-time`` seconds (at most 50), after one warm-up call at the same N;
    - peak memory: ``ru_maxrss`` (the process's peak resident set) after the timed calls minus ``ru_maxrss``
      once the module and the input exist and a small warm-up forward has run (N = 64; none for a
      ``seq_len``-bound mixer, whose figure then also holds the first call's one-time setup): the extra
      resident memory that a forward at N needs, weights and input excluded.
``--in-process`` (implied by ``--quick``) runs every case in this process instead: faster, but the memory column
is then left empty, since ``ru_maxrss`` only grows. Cases that fail to build or run (a ``seq_len``-bound mixer
whose parameters grow with N², a case over the memory cap ``--mem-gb`` or over ``--timeout`` seconds) are
skipped and the reason is printed.

Reported beside the table: the speed-up over ``full`` at 4K next to the Long Range Arena figure (TPU v3, byte
text, batch 32; ../shared/REFERENCES.md) and the growth t(16K) / t(1K), with the issue's target of at most 24x
for the mixers whose registered complexity is linear in N (full attention grows about 256x).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

# Long Range Arena, speed-up over the vanilla Transformer at 4K tokens and peak memory at 4K.
LRA_4K = {
    'full': ('Transformer', 1.0, '9.48 GB'), 'performer': ('Performer', 5.7, '1.06 GB'),
    'linear': ('Linear Transformer', 5.6, '1.03 GB'), 'linformer': ('Linformer', 5.5, '0.99 GB'),
    'local': ('Local attention', 5.3, '1.37 GB'), 'sinkhorn': ('Sinkhorn', 3.8, '1.48 GB'),
    'synthesizer_dense': ('Synthesizer', 1.4, '6.99 GB'), 'bigbird': ('BigBird', 1.1, '2.88 GB'),
    'reformer': ('Reformer', 0.8, '2.28 GB'),
}
GROWTH_TARGET = 24.0
# Arguments beside the defaults (printed with the results): SOFT at the paper's fixed 7×7 landmarks (m = 49 at every
# size, which its per-stage strides give at 224²); at a fixed stride its landmarks grow as N (see its docstring).
MIXER_ARGS = {'soft': dict(landmarks='pool', landmark_grid=7)}
WARMUP_N = 64
MAX_REPEATS = 50


def is_linear(complexity: str) -> bool:
    """True when a registered complexity such as ``'O(N·w)'`` or ``'O(N·C²/H)'`` is linear in N."""
    m = re.match(r'\s*O\((.*)\)', complexity)
    if not m:
        return False
    expr = m.group(1).replace(' ', '')
    if '(H+W)' in expr:  # the grid's sides (a grid mixer's H and W; elsewhere H is the heads): √N each
        return False
    return expr.startswith('N') and not expr.startswith('N²') and 'N' not in expr[1:]


def run_case(name: str, n: int, dim: int, heads: int, repeats: int, threads: int | None, min_time: float = 0.) -> dict:
    """Build mixer ``name`` and measure one size (in the child process, or in this one with ``--in-process``)."""
    import torch

    import visattn

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    kw = visattn.mixers.length_kwargs(name, n)
    mixer = visattn.create_mixer(name, dim, num_heads=heads, **kw, **MIXER_ARGS.get(name, {})).eval()
    x = torch.randn(1, n, dim)
    with torch.inference_mode():
        if not kw:
            mixer(x[:, :WARMUP_N])  # loads the code paths (a seq_len-bound mixer accepts only N)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        mixer(x)  # warm-up at N
        times: list[float] = []
        while len(times) < repeats or (sum(times) < min_time and len(times) < MAX_REPEATS):
            t0 = time.perf_counter()
            mixer(x)
            times.append(time.perf_counter() - t0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == 'darwin' else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {'ms': statistics.median(times) * 1e3, 'peak_mib': (peak - base) * scale / 2 ** 20}


def child_main(args: argparse.Namespace) -> None:
    if args.mem_gb:
        cap = int(args.mem_gb * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        res = run_case(args.case, args.n, args.dim, args.heads, args.repeats, args.threads, args.min_time or 0.)
    except (MemoryError, RuntimeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, MemoryError) or "can't allocate memory" in msg or 'out of memory' in msg:
            msg = f'over the {args.mem_gb:g} GiB memory cap'
        res = {'skip': f'{type(e).__name__}: {msg}'[:160]}
    print(json.dumps(res), flush=True)


def measure(name: str, n: int, args: argparse.Namespace) -> dict:
    if args.in_process:
        try:
            res = run_case(name, n, args.dim, args.heads, args.repeats, args.threads, args.min_time)
        except (MemoryError, RuntimeError, ValueError) as e:
            return {'skip': f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:160]}
        res.pop('peak_mib')
        return res
    cmd = [sys.executable, os.path.abspath(__file__), '--case', name, '--n', str(n), '--dim', str(args.dim),
           '--heads', str(args.heads), '--repeats', str(args.repeats), '--mem-gb', str(args.mem_gb),
           '--min-time', str(args.min_time)]
    if args.threads:
        cmd += ['--threads', str(args.threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {'skip': f'over the {args.timeout:g} s time limit'}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{')]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
        return {'skip': f'exit {proc.returncode}: {tail}'[:160]}
    return json.loads(lines[-1])


def fmt(res: dict | None, key: str, spec: str) -> str:
    return format(res[key], spec) if res and key in res else '—'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='N = 128, 512, dim 64, 4 heads, in one process')
    parser.add_argument('--mixers', nargs='*', default=None, help='registry names (default: every mixer)')
    parser.add_argument('--sizes', nargs='*', type=int, default=None)
    parser.add_argument('--dim', type=int, default=None)
    parser.add_argument('--heads', type=int, default=None)
    parser.add_argument('--repeats', type=int, default=None)
    parser.add_argument('--min-time', type=float, default=None,
                        help='keep repeating a case until its timed calls add up to this many seconds (max 50 calls)')
    parser.add_argument('--threads', type=int, default=None, help='torch threads in each case')
    parser.add_argument('--timeout', type=float, default=None, help='seconds per case')
    parser.add_argument('--mem-gb', type=float, default=16., help='address-space cap per case (0: none)')
    parser.add_argument('--in-process', action='store_true', help='no subprocesses (no memory figures)')
    parser.add_argument('--case', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--n', type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        child_main(args)
        return
    args.sizes = args.sizes or ([128, 512] if args.quick else [1024, 4096, 16384])
    args.dim = args.dim or (64 if args.quick else 256)
    args.heads = args.heads or (4 if args.quick else 8)
    args.repeats = args.repeats or 3
    if args.min_time is None:
        args.min_time = 0.2 if args.quick else 1.0
    args.timeout = args.timeout or (60. if args.quick else 600.)
    args.in_process = args.in_process or args.quick

    import torch

    import visattn

    names = args.mixers or visattn.list_mixers()
    sizes = sorted(args.sizes)
    threads = args.threads or torch.get_num_threads()
    where = 'all cases in one process' if args.in_process else 'one subprocess per case'
    print(f'torch {torch.__version__}, CPU, {threads} threads; batch 1, dim {args.dim}, {args.heads} heads, '
          f'fp32 forward (inference mode), median of >= {args.repeats} calls (>= {args.min_time:g} s); {where}')
    extra = {k: v for k, v in MIXER_ARGS.items() if k in names}
    if extra:
        print(f'arguments beside the defaults: {extra}')
    results: dict[str, dict[int, dict]] = {}
    skips: list[str] = []
    for name in names:
        results[name] = {}
        for n in sizes:
            res = measure(name, n, args)
            results[name][n] = res
            if 'skip' in res:
                skips.append(f'{name} at N={n}: {res["skip"]}')
            line = f'{res["ms"]:10.2f} ms  {fmt(res, "peak_mib", "9.1f")} MiB' if 'ms' in res else \
                f'skipped ({res["skip"]})'
            print(f'  {name:32s} N={n:6d}  {line}', file=sys.stderr, flush=True)

    mid = 4096 if 4096 in sizes else sizes[len(sizes) // 2]
    lo, hi = sizes[0], sizes[-1]
    full_mid = results.get('full', {}).get(mid)
    head = ' | '.join(f't {n} ms' for n in sizes) + ' | ' + ' | '.join(f'peak {n} MiB' for n in sizes)
    print(f'\n| mixer | {head} | speed-up vs full at {mid} | LRA at 4K (speed-up, memory) '
          f'| t({hi})/t({lo}) | linear in N: target <= {GROWTH_TARGET * hi / lo / 16:g}x |')
    print('|---|' + '---:|' * (2 * len(sizes) + 2) + '---|---|')
    for name in names:
        row = results[name]
        cells = [fmt(row[n], 'ms', '.2f') for n in sizes] + [fmt(row[n], 'peak_mib', '.1f') for n in sizes]
        speed = '—'
        if full_mid and 'ms' in full_mid and 'ms' in row[mid]:
            speed = f'{full_mid["ms"] / row[mid]["ms"]:.2f}x'
        lra = LRA_4K.get(name)
        lra_txt = f'{lra[0]}: {lra[1]:g}x, {lra[2]}' if lra else ''
        growth, verdict = '—', ''
        if 'ms' in row[lo] and 'ms' in row[hi]:
            g = row[hi]['ms'] / row[lo]['ms']
            growth = f'{g:.1f}x'
            if is_linear(visattn.info(name).complexity):
                verdict = 'ok' if g <= GROWTH_TARGET * (hi / lo) / 16 else 'MISSED'
        print(f'| {name} | ' + ' | '.join(cells) + f' | {speed} | {lra_txt} | {growth} | {verdict} |')
    if skips:
        print('\nSkipped:')
        for s in skips:
            print(f'- {s}')


if __name__ == '__main__':
    main()
