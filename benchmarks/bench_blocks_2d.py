"""CPU time and peak memory of the context and local 2-D blocks, and how both grow when H and W double.

    python benchmarks/bench_blocks_2d.py            # [2, 512, 97, 97] and [8, 256, 56, 56]; growth 48² -> 96²
    python benchmarks/bench_blocks_2d.py --quick    # tiny shapes, a smoke run
    python benchmarks/bench_blocks_2d.py --names cc efficient --threads 8

Blocks are built by registry name with their defaults (``visattn.create_attn(name, C)``); a name that is not
registered is skipped with a note. Every case runs in a fresh process, forked from the parent after torch and
visattn are imported (and before the parent runs any torch op), so that each starts with its own high-water mark:

- time: median of ``--repeats`` calls after warm-up, forward under ``torch.no_grad()`` in eval mode, and
  forward + backward (of ``out.sum()``) in training mode;
- peak memory: the process's resident-set high-water mark (``getrusage(RUSAGE_SELF).ru_maxrss``) after the first
  timed call, minus the resident set just before it (module, input, and the torch runtime warmed up by one call on
  a 5×5 input, already in place). It counts
  every allocation torch makes through the system allocator (activations, temporaries, gradients), which
  ``tracemalloc`` cannot see. It is at least the true peak of the call, rounded up by the allocator's reuse
  of freed pages, so small cases (a few MB) read as noise.

Growth: the ratio of time and memory at 2H×2W over H×W, printed beside the ratio the mechanism's complexity
predicts: cc and axial (whole-axis span) HW·(H+W), 8×; sasa, halo (k² and b fixed), efficient, ema, external
(K, S fixed) and da_channel HW, 4×; nl, da and da_position (HW)², 16× in time. In memory nl predicts 4×, not 16×:
it runs in ``scaled_dot_product_attention``, whose flash kernels never hold the (HW)² matrix; da's position
branch does (its value is wider than its query, which the fused CPU kernel does not take). The memory of small
cases is dominated by HW·C activations, which grow 4×.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time
from multiprocessing.connection import Connection

NAMES = ['cc', 'da', 'da_position', 'da_channel', 'sasa', 'halo', 'axial', 'efficient', 'nl', 'ema', 'external']
# name -> (time, memory) ratio predicted when H and W double
EXPECTED_GROWTH = {
    'cc': (8, 8), 'axial': (8, 8), 'sasa': (4, 4), 'halo': (4, 4), 'efficient': (4, 4), 'ema': (4, 4),
    'external': (4, 4), 'da_channel': (4, 4), 'nl': (16, 4), 'da': (16, 16), 'da_position': (16, 16),
}


def _rss_now_kb() -> int:
    with open('/proc/self/statm') as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() // 1024


def worker(spec: dict, conn: Connection) -> None:
    """Run one case in this (forked) process and send back its figures (milliseconds, MiB)."""
    import torch

    import visattn

    torch.set_num_threads(spec['threads'])
    torch.manual_seed(0)
    shape = spec['shape']
    module = visattn.create_attn(spec['name'], shape[1])
    x = torch.randn(*shape)
    if spec['mode'] == 'fwd':
        module.eval()

        def step() -> None:
            with torch.no_grad():
                module(x)
    else:
        module.train()
        x.requires_grad_(True)

        def step() -> None:
            x.grad = None
            module.zero_grad(set_to_none=True)
            module(x).sum().backward()

    tiny = torch.randn(1, shape[1], min(5, shape[2]), min(5, shape[3]), requires_grad=spec['mode'] != 'fwd')
    if spec['mode'] == 'fwd':
        with torch.no_grad():
            module(tiny)  # loads torch's lazily initialised kernels and pools before the baseline
    else:
        module(tiny).sum().backward()
        module.zero_grad(set_to_none=True)
    base_kb = _rss_now_kb()
    step()
    peak_mib = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb) / 1024
    for _ in range(spec['warmup']):
        step()
    times = []
    for _ in range(spec['repeats']):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    conn.send({'ms': statistics.median(times) * 1e3, 'peak_mib': peak_mib})


def _guarded_worker(spec: dict, conn: Connection) -> None:
    try:
        worker(spec, conn)
    except Exception as e:  # reported by the parent; the benchmark goes on with the other cases
        conn.send({'error': f'{type(e).__name__}: {e}'})


def run_case(name: str, shape: tuple[int, ...], mode: str, args: argparse.Namespace) -> dict | None:
    spec = dict(name=name, shape=list(shape), mode=mode, threads=args.threads, repeats=args.repeats,
                warmup=args.warmup)
    ctx = mp.get_context('fork')
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_guarded_worker, args=(spec, child))
    proc.start()
    child.close()
    try:
        result = parent.recv() if parent.poll(args.timeout) else {'error': f'no result within {args.timeout} s'}
    except EOFError:
        result = {'error': 'the process died (out of memory?)'}
    proc.join(1)
    if proc.is_alive():
        proc.kill()
    if 'error' in result:
        print(f'  ! {name} {list(shape)} {mode}: {result["error"]}')
        return None
    return result


def _fmt(case: dict | None, key: str) -> str:
    return '-' if case is None else f'{case[key]:.1f}'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='tiny shapes and few repeats: a smoke run')
    parser.add_argument('--names', nargs='+', default=NAMES, help='registry names of the blocks')
    parser.add_argument('--repeats', type=int, default=None)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: all cores)')
    parser.add_argument('--growth', type=int, nargs=4, metavar=('B', 'C', 'H', 'W'),
                        help='smaller shape of the growth comparison (default 1 64 48 48; --quick 1 16 8 8)')
    parser.add_argument('--skip-shapes', action='store_true', help='only the growth comparison')
    parser.add_argument('--timeout', type=float, default=1800, help='seconds allowed to one case')
    args = parser.parse_args()

    import torch

    import visattn

    args.threads = args.threads or torch.get_num_threads()
    args.repeats = args.repeats or (2 if args.quick else 5)
    shapes = [(2, 32, 13, 13), (2, 16, 14, 14)] if args.quick else [(2, 512, 97, 97), (8, 256, 56, 56)]
    growth = tuple(args.growth) if args.growth else (1, 16, 8, 8) if args.quick else (1, 64, 48, 48)
    known = set(visattn.list_attn())
    names = [n for n in args.names if n in known]
    for n in args.names:
        if n not in known:
            print(f'note: {n!r} is not registered (yet); skipped')
    print(f'torch {torch.__version__}, {args.threads} threads, CPU fp32, median of {args.repeats} after '
          f'{args.warmup} warm-up; peak = ru_maxrss high-water minus RSS before the first call, fresh process per case')

    for shape in [] if args.skip_shapes else shapes:
        print(f'\n{list(shape)}')
        print('| block | fwd ms | fwd+bwd ms | fwd peak MiB | fwd+bwd peak MiB |\n|---|---:|---:|---:|---:|')
        for name in names:
            fwd, both = run_case(name, shape, 'fwd', args), run_case(name, shape, 'fwdbwd', args)
            print(f"| {name} | {_fmt(fwd, 'ms')} | {_fmt(both, 'ms')} | {_fmt(fwd, 'peak_mib')} | "
                  f"{_fmt(both, 'peak_mib')} |", flush=True)

    big = (*growth[:2], 2 * growth[2], 2 * growth[3])
    print(f'\ngrowth from {list(growth)} to {list(big)} (H and W doubled), forward + backward')
    print('| block | time ratio | expected | memory ratio | expected |\n|---|---:|---:|---:|---:|')
    for name in names:
        small, large = run_case(name, growth, 'fwdbwd', args), run_case(name, big, 'fwdbwd', args)
        if small is None or large is None:
            continue
        mem = f"{large['peak_mib'] / small['peak_mib']:.1f}x" if small['peak_mib'] >= 1 else 'n/a (< 1 MiB)'
        t_exp, m_exp = (f'{e}x' for e in EXPECTED_GROWTH[name]) if name in EXPECTED_GROWTH else ('?', '?')
        print(f"| {name} | {large['ms'] / small['ms']:.1f}x | {t_exp} | {mem} | {m_exp} |", flush=True)


if __name__ == '__main__':
    main()
