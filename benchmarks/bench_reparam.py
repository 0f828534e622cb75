"""CPU inference time of the re-parameterisable ResNets: training form (eval mode) against the deployed form (after
`visattn.reparameterize`) against timm's plain ResNet of the same depth.

    python benchmarks/bench_reparam.py                      # batch 8, 224², 2 threads, 3 processes x 5 repeats
    python benchmarks/bench_reparam.py --quick              # batch 2, 64², a smoke run
    python benchmarks/bench_reparam.py --models resnet50_dbb --processes 5 --repeats 10

Each model is timed in several fresh processes; in each, the three networks run interleaved (training form,
deployed, plain, training form, ...) after a warm-up, so that drifts of a shared machine hit all three alike. Each
process first checks that the deployed network computes the training form's output (float32, eval) and reports
the largest difference relative to the output's largest magnitude. The table gives the median over processes of
the per-process medians, the minimum over processes of the per-process minimums, and the ratios of medians per
process (median over processes, with their range). The deployed network should run at the plain ResNet's speed
(its 3×3 convs carry a bias instead of a batch norm, so at most 1.0× plain) and faster than the training form.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys

import timm
import torch
from bench_gating import _infer, interleaved_times

import visattn

MODELS = ['resnet18_acnet', 'resnet50_acnet', 'resnet18_dbb', 'resnet50_dbb']


def calibrated(name: str, size: int) -> torch.nn.Module:
    """``name`` in eval mode with random batch-norm weights and the running statistics of one batch (so that the
    deployed network's check is not trivial: timm's zero-initialised last norms would make every residual branch 0)."""
    model = timm.create_model(name)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.2)
                m.momentum = 1.
        model.train()(torch.randn(2, 3, size, size))
    return model.eval()


def once(name: str, quick: bool, repeats: int) -> dict:
    """One process: {'times': [(median, min) of training form, deployed, plain], 'rel_err': float}."""
    torch.manual_seed(0)
    size, batch = (64, 2) if quick else (224, 8)
    x = torch.randn(batch, 3, size, size)
    train = calibrated(name, size)
    deployed = visattn.reparameterize(copy.deepcopy(train))
    plain = timm.create_model(name.split('_')[0]).eval()
    with torch.inference_mode():
        want, got = train(x), deployed(x)
    rel_err = ((got - want).abs().max() / want.abs().max()).item()
    times = interleaved_times([_infer(train, x), _infer(deployed, x), _infer(plain, x)], repeats, warmup=1)
    return {'times': times, 'rel_err': rel_err}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='batch 2, 64², few repeats')
    parser.add_argument('--models', default=','.join(MODELS), help='comma-separated model names')
    parser.add_argument('--processes', type=int, default=3, help='fresh processes per model (default 3)')
    parser.add_argument('--repeats', type=int, default=None, help='interleaved repeats per process (default 5)')
    parser.add_argument('--threads', type=int, default=2, help='torch threads (default 2)')
    parser.add_argument('--once', help=argparse.SUPPRESS)  # one process of one model
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 5)
    if args.once:
        print(json.dumps(once(args.once, args.quick, repeats)))
        return
    size, batch = (64, 2) if args.quick else (224, 8)
    print(f'torch {torch.__version__}, timm {timm.__version__}, {args.threads} threads; inference, batch {batch}, '
          f'{size}², fp32; {args.processes} fresh processes x {repeats} interleaved repeats per model')
    print('| model | training form ms (median / min) | deployed ms | plain ms | deployed / training | '
          'deployed / plain | max rel. diff |\n|---|---:|---:|---:|---:|---:|---:|')
    for name in args.models.split(','):
        runs = []
        for _ in range(args.processes):
            cmd = [sys.executable, __file__, '--once', name, '--repeats', str(repeats), '--threads', str(args.threads)]
            cmd += ['--quick'] if args.quick else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out.splitlines()[-1]))
        cells = []
        for i in range(3):
            med = statistics.median(r['times'][i][0] for r in runs)
            low = min(r['times'][i][1] for r in runs)
            cells.append(f'{med * 1e3:.0f} / {low * 1e3:.0f}')
        for i, j in ((1, 0), (1, 2)):
            ratios = sorted(r['times'][i][0] / r['times'][j][0] for r in runs)
            cells.append(f'{statistics.median(ratios):.2f} ({ratios[0]:.2f}–{ratios[-1]:.2f})')
        err = max(r['rel_err'] for r in runs)
        print(f'| {name} | ' + ' | '.join(cells) + f' | {err:.1e} |', flush=True)


if __name__ == '__main__':
    main()
