"""CPU throughput of the registered models beside their timm base models, for the model zoo's cards.

    python benchmarks/bench_zoo.py                               # every registered model (hours on 2 cores)
    python benchmarks/bench_zoo.py --models 'resnet50_*' sknet50 --processes 3
    python benchmarks/bench_zoo.py --models resnet18_se --repeats 3 --processes 2 --out /tmp/zoo.csv

Images per second of the forward pass (eval mode, ``torch.inference_mode()``), batch ``--batch`` (8) at the
model's default input size, float32, ``--threads`` (2) threads: each measurement runs in a fresh process (a new
interpreter: nothing cached, allocator and thread pool new), which times ``--repeats`` calls after ``--warmup``
and reports the median; the figure is the median over ``--processes`` such processes. The timm base model of each
model (``visattn.zoo.base_model``) is measured the same way, once per run, beside it.

Results are merged into ``--out`` (``benchmarks/results/cpu_zoo.csv``: one row per model, a new measurement
replaces the old row), which `visattn zoo` reads for the cards; run ``visattn zoo --write models/`` afterwards.
Each row records the machine, the torch version, the date and the load average before the measurement, because
other processes on the machine slow every figure: compare rows measured together, under a low load.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import fnmatch
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

FIELDS = ('model', 'images_per_s', 'base_model', 'base_images_per_s', 'batch', 'threads', 'processes', 'repeats',
          'load_avg', 'machine', 'torch', 'date')
DEFAULT_OUT = Path(__file__).resolve().parent / 'results' / 'cpu_zoo.csv'


def worker(name: str, batch: int, threads: int, warmup: int, repeats: int) -> float:
    """Images per second of ``name`` in this process (median of ``repeats`` timed calls)."""
    import time

    import timm
    import torch

    import visattn  # noqa: F401  (registers the models)

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(batch, *model.pretrained_cfg['input_size'])
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def measure(name: str, args: argparse.Namespace) -> float:
    """The median images/s of ``name`` over ``args.processes`` fresh processes."""
    cmd = [sys.executable, __file__, '--worker', name, '--batch', str(args.batch), '--threads', str(args.threads),
           '--warmup', str(args.warmup), '--repeats', str(args.repeats)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    runs = []
    for _ in range(args.processes):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
        if out.returncode != 0:
            raise RuntimeError(f'{name}: the worker failed: {out.stderr.strip().splitlines()[-1:]}')
        runs.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(runs)


def read(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        return {}
    with path.open(newline='') as f:
        return {row['model']: row for row in csv.DictReader(f)}


def write(path: Path, rows: dict[str, dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix('.tmp')
    with tmp.open('w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, lineterminator='\n')
        w.writeheader()
        for name in sorted(rows):
            w.writerow({k: rows[name].get(k, '') for k in FIELDS})
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['*'], metavar='PATTERN', help='fnmatch patterns (all)')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--processes', type=int, default=3, help='fresh processes per model; the median is kept')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--timeout', type=float, default=900, help='seconds per process')
    parser.add_argument('--out', type=Path, default=DEFAULT_OUT)
    parser.add_argument('--worker', metavar='MODEL', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(worker(args.worker, args.batch, args.threads, args.warmup, args.repeats))
        return 0

    import torch

    import visattn
    from visattn.zoo import base_model

    registered = visattn.list_models()  # in the order of the patterns given, each model once
    names = list(dict.fromkeys(n for p in args.models for n in registered if fnmatch.fnmatch(n, p)))
    if not names:
        print(f'bench_zoo: no registered model matches {args.models}', file=sys.stderr)
        return 2
    rows = read(args.out)
    bases: dict[str, float] = {}
    machine = f'{platform.machine()} {os.cpu_count()} cores'
    failed = []
    for name in names:
        load = os.getloadavg()[0]
        base = base_model(name)
        try:
            ips = measure(name, args)
            if base is not None and base not in bases:
                bases[base] = measure(base, args)
        except (RuntimeError, subprocess.TimeoutExpired) as e:  # one model's failure does not stop the others
            print(f'{name:45s} FAILED: {e}', flush=True)
            failed.append(name)
            continue
        rows[name] = dict(
            model=name, images_per_s=f'{ips:.2f}', base_model=base or '',
            base_images_per_s=f'{bases[base]:.2f}' if base else '', batch=args.batch, threads=args.threads,
            processes=args.processes, repeats=args.repeats, load_avg=f'{load:.1f}', machine=machine,
            torch=torch.__version__.split('+')[0], date=datetime.date.today().isoformat())
        base_txt = f'  ({base}: {bases[base]:.2f})' if base else ''
        print(f'{name:45s} {ips:8.2f} images/s{base_txt}  load {load:.1f}', flush=True)
        write(args.out, rows)
    if failed:
        print(f'bench_zoo: {len(failed)} failed: {", ".join(failed)}', file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
