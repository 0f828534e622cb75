"""CPU speed of the gating blocks against timm's counterparts, and of resnet50_cbam against resnet50.

    python benchmarks/bench_gating.py            # [8, 256, 56, 56] blocks, batch-8 224² models
    python benchmarks/bench_gating.py --quick    # small shapes, a smoke run

Each case is timed over interleaved repeats (ours, theirs, ours, ...), after warm-up, so that drifts of the
machine hit both sides alike; the table gives the median and the minimum (the run least disturbed by other
work on the machine) of each side, and the ratio of each. Targets (issue 2): forward + backward of each block at most
1.0× timm's time; resnet50_cbam inference at most 1.10× plain resnet50.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import torch
from timm.layers.cbam import CbamModule
from timm.layers.eca import EcaModule
from timm.layers.global_context import GlobalContext
from timm.layers.selective_kernel import SelectiveKernel
from timm.layers.squeeze_excite import SEModule

import visattn


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
    """(median, min) seconds of each function, timed in interleaved rounds."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return [(statistics.median(t), min(t)) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='small shapes, few repeats')
    parser.add_argument('--repeats', type=int, default=None)
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch default)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = (2, 64, 28, 28) if args.quick else (8, 256, 56, 56)
    repeats = args.repeats or (3 if args.quick else 15)
    c = shape[1]
    pairs = {
        'se': (visattn.create_attn('se', c), SEModule(c, rd_ratio=1 / 16, rd_divisor=1)),
        'eca': (visattn.create_attn('eca', c), EcaModule(c)),
        'cbam': (visattn.create_attn('cbam', c), CbamModule(c, rd_ratio=1 / 16)),
        'gc': (visattn.create_attn('gc', c), GlobalContext(c, fuse_add=True, fuse_scale=False, rd_ratio=1 / 16)),
        'sk': (visattn.create_attn('sk', c), SelectiveKernel(c, c, kernel_size=[3, 5], groups=32, rd_channels=32,
                                                             split_input=False)),
    }
    print(f'torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, '
          f'{repeats} interleaved repeats; times in ms as median / min')
    print(f'\nforward + backward at {list(shape)} (fp32, CPU)')
    print('| block | visattn ms | timm ms | ratio median / min (target <= 1.00) |\n|---|---:|---:|---:|')
    for name, (ours, theirs) in pairs.items():
        x = torch.randn(*shape, requires_grad=True)
        a, b = interleaved_times([_fwd_bwd(ours, x), _fwd_bwd(theirs, x)], repeats)
        print(f'| {name} | {_ms(a)} | {_ms(b)} | {_ratio(a, b)} |')

    size = 64 if args.quick else 224
    batch = 2 if args.quick else 8
    x = torch.randn(batch, 3, size, size)
    cbam = timm.create_model('resnet50_cbam').eval()
    plain = timm.create_model('resnet50').eval()
    t_cbam, t_plain = interleaved_times([_infer(cbam, x), _infer(plain, x)], repeats)
    print(f'\ninference, batch {batch}, {size}² (fp32, CPU)')
    print('| model | ms | ratio to resnet50, median / min (target <= 1.10) |\n|---|---:|---:|')
    print(f'| resnet50 | {_ms(t_plain)} | 1.00 |')
    print(f'| resnet50_cbam | {_ms(t_cbam)} | {_ratio(t_cbam, t_plain)} |')


def _ms(t: tuple[float, float]) -> str:
    return f'{t[0] * 1e3:.1f} / {t[1] * 1e3:.1f}'


def _ratio(a: tuple[float, float], b: tuple[float, float]) -> str:
    return f'{a[0] / b[0]:.2f} / {a[1] / b[1]:.2f}'


if __name__ == '__main__':
    main()
