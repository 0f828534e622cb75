"""CPU speed of the gating blocks against timm's counterparts (same function, checked first), and of resnet50_cbam
against resnet50.

    python benchmarks/bench_gating.py            # [8, 256, 56, 56] blocks, batch-8 224² models
    python benchmarks/bench_gating.py --quick    # small shapes, a smoke run
    python benchmarks/bench_gating.py --only models --processes 8 --repeats 20

Each case is timed over interleaved repeats (ours, theirs, ours, ...), after warm-up, so that drifts of the
machine hit both sides alike, and each table is measured in several fresh processes: on a shared virtual machine
the speed of the same code varies from process to process (memory placement, neighbours) by more than the
differences measured here, so one process proves little. Per process, the ratio of the medians and the ratio of
the minimums (the repeat least disturbed); the table gives the median of each over the processes, with their
range. Targets: forward (inference) and forward + backward of each block at most 1.0× timm's time; resnet50_cbam
inference at most 1.10× plain resnet50. timm 1.0.31's ``GatherExcite`` cannot build its parametric forms (a
``*dd`` bug in its constructor), so ``ge`` is timed in its parameter-free form θ⁻, which builds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable

import timm
import torch
from timm.layers.cbam import CbamModule, LightCbamModule
from timm.layers.coord_attn import CoordAttn, EfficientLocalAttn, SimpleCoordAttn, StripAttn
from timm.layers.eca import CecaModule, EcaModule
from timm.layers.gather_excite import GatherExcite
from timm.layers.global_context import GlobalContext
from timm.layers.selective_kernel import SelectiveKernel
from timm.layers.split_attn import SplitAttn
from timm.layers.squeeze_excite import EffectiveSEModule, SEModule

import visattn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import interleaved_times as _interleaved_times  # noqa: E402
from _harness import median_and_min  # noqa: E402


def _fwd_bwd(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).sum().backward()
    return step


def _infer(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode():
            module(x)
    return step


def interleaved_times(fns: list[Callable[[], None]], repeats: int, warmup: int = 2) -> list[tuple[float, float]]:
    """(median, min) seconds of each function, timed in interleaved rounds (`_harness.interleaved_times`)."""
    return [median_and_min(t) for t in _interleaved_times(fns, repeats, warmup)]


def block_pairs(c: int) -> dict[str, tuple[torch.nn.Module, torch.nn.Module]]:
    """name -> (ours, timm's) computing the same function at ``c`` channels (weights copied where they differ)."""
    coord = CoordAttn(c)
    pairs = {
        'se': (visattn.create_attn('se', c), SEModule(c, rd_ratio=1 / 16, rd_divisor=1)),
        'eca': (visattn.create_attn('eca', c), EcaModule(c)),
        'cbam': (visattn.create_attn('cbam', c, mlp_bias=False), CbamModule(c, rd_ratio=1 / 16)),
        'gc': (visattn.create_attn('gc', c), GlobalContext(c, fuse_add=True, fuse_scale=False, rd_ratio=1 / 16)),
        'sk': (visattn.create_attn('sk', c), SelectiveKernel(c, c, kernel_size=[3, 5], groups=32, rd_channels=32,
                                                             split_input=False)),
        'ese': (visattn.create_attn('ese', c), EffectiveSEModule(c)),
        'ecam': (visattn.create_attn('ecam', c), EcaModule(c, use_mlp=True)),
        'ceca': (visattn.create_attn('ceca', c), CecaModule(c)),
        'ge': (visattn.create_attn('ge', c, extent=8), GatherExcite(c, extent=8, use_mlp=False)),
        'lcbam': (visattn.create_attn('lcbam', c, mlp_bias=False), LightCbamModule(c)),
        'coord': (visattn.create_attn('coord', c, rd_channels=coord.conv1.out_channels, bias=False), coord),
        'scoord': (visattn.create_attn('scoord', c), SimpleCoordAttn(c)),
        'ela': (visattn.create_attn('ela', c, shared=False, groups=c, norm_groups=1, act_layer=torch.nn.SiLU),
                EfficientLocalAttn(c)),
        'strip': (visattn.create_attn('strip', c, groups=c, norm_layer=None, fuse=False), StripAttn(c)),
        'splat': (visattn.create_attn('splat', c), SplitAttn(c, norm_layer=torch.nn.BatchNorm2d)),
    }
    for name, (ours, theirs) in pairs.items():
        if name != 'sk':  # SK's layout differs (its equality is checked in the tests)
            ours.load_state_dict(theirs.state_dict())
    return pairs


def _same_function(ours: torch.nn.Module, theirs: torch.nn.Module, c: int) -> None:
    x = torch.randn(2, c, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), rtol=1e-4, atol=1e-4)


def blocks_once(quick: bool, repeats: int) -> dict[str, list[tuple[float, float]]]:
    """Forward (inference) and forward + backward (training mode) of each gating block and timm's module:
    '<name> fwd' / '<name> fwd+bwd' -> [(median, min) ours, theirs]."""
    shape = (2, 64, 28, 28) if quick else (8, 256, 56, 56)
    c = shape[1]
    out = {}
    for name, (ours, theirs) in block_pairs(c).items():
        if name != 'sk':
            _same_function(ours, theirs, c)
        x = torch.randn(*shape)
        ours.eval(), theirs.eval()
        out[f'{name} fwd'] = interleaved_times([_infer(ours, x), _infer(theirs, x)], repeats)
        ours.train(), theirs.train()
        x.requires_grad_()
        out[f'{name} fwd+bwd'] = interleaved_times([_fwd_bwd(ours, x), _fwd_bwd(theirs, x)], repeats)
    return out


def models_once(quick: bool, repeats: int) -> dict[str, list[tuple[float, float]]]:
    """Inference of resnet50_cbam and plain resnet50: name -> [(median, min) resnet50_cbam, resnet50]."""
    size, batch = (64, 2) if quick else (224, 8)
    x = torch.randn(batch, 3, size, size)
    cbam = timm.create_model('resnet50_cbam').eval()
    plain = timm.create_model('resnet50').eval()
    return {'resnet50_cbam': interleaved_times([_infer(cbam, x), _infer(plain, x)], repeats)}


TABLES = {'blocks': blocks_once, 'models': models_once}


def table(name: str, args: argparse.Namespace, repeats: int) -> None:
    """Run ``TABLES[name]`` in ``args.processes`` fresh processes and print the table."""
    runs = []
    for _ in range(args.processes):
        cmd = [sys.executable, __file__, '--once', name, '--repeats', str(repeats)]
        cmd += (['--quick'] if args.quick else []) + (['--threads', str(args.threads)] if args.threads else [])
        runs.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    if name == 'blocks':
        shape = [2, 64, 28, 28] if args.quick else [8, 256, 56, 56]
        print(f'\nforward (inference) and forward + backward (training) at {shape} (fp32, CPU)')
        print('| block | visattn ms | timm ms | ratio of medians | ratio of minimums | target |\n'
              '|---|---:|---:|---:|---:|---:|')
    else:
        size, batch = (64, 2) if args.quick else (224, 8)
        print(f'\ninference, batch {batch}, {size}² (fp32, CPU)')
        print('| model | ms | resnet50 ms | ratio of medians | ratio of minimums | target |\n'
              '|---|---:|---:|---:|---:|---:|')
    for row in runs[0]:
        ours = statistics.median(r[row][0][0] for r in runs)
        theirs = statistics.median(r[row][1][0] for r in runs)
        cells = []
        for j in (0, 1):  # medians, minimums
            ratios = sorted(r[row][0][j] / r[row][1][j] for r in runs)
            cells.append(f'{statistics.median(ratios):.2f} ({ratios[0]:.2f}–{ratios[-1]:.2f})')
        target = '<= 1.00' if name == 'blocks' else '<= 1.10'
        print(f'| {row} | {ours * 1e3:.1f} | {theirs * 1e3:.1f} | {cells[0]} | {cells[1]} | {target} |')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='small shapes, few repeats')
    parser.add_argument('--repeats', type=int, default=None, help='interleaved repeats per process')
    parser.add_argument('--processes', type=int, default=5, help='fresh processes per table (default 5)')
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch default)')
    parser.add_argument('--only', choices=tuple(TABLES), default=None, help='one of the two tables')
    parser.add_argument('--once', choices=tuple(TABLES), help=argparse.SUPPRESS)  # one process of a table
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 15)
    if args.once:
        print(json.dumps(TABLES[args.once](args.quick, repeats)))
        return
    print(f'torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads; '
          f'{args.processes} fresh processes of {repeats} interleaved repeats per table; ratios: median over the '
          'processes (range)')
    for name in TABLES:
        if args.only in (None, name):
            table(name, args, repeats)


if __name__ == '__main__':
    main()
