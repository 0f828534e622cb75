"""``visattn bench``: time and peak memory of any block or mixer on the user's own machine, beside a baseline.

The baseline of a token mixer is ``full`` softmax attention of the same width and heads; the baseline of a 2-D block
is timm's module of the same name where timm has one (``timm.layers.create_attn``'s names, and PoolFormer's
``Pooling``), otherwise none. Each repeat times one call of ours and one of the baseline, alternately, so that both
see the same machine state; the figures are the minimum and the median over the repeats. Peak memory is the
high-water mark of one call: ``torch.cuda.max_memory_allocated`` on a GPU, the growth of the process's resident
set over one call on a CPU (Linux: freed heap memory handed back first, then ``VmHWM`` reset through
``/proc/self/clear_refs``; elsewhere not measured).
"""

from __future__ import annotations

import gc
import importlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from . import registry
from .mixers import length_kwargs

__all__ = ['BenchResult', 'baseline_of', 'bench', 'build_case', 'main', 'parse_shape']

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16, 'float64': torch.float64}
DEFAULT_SHAPE = {'attn': (8, 64, 56, 56), 'mixer': (1, 1024, 256)}

BenchResult = dict[str, Any]


def parse_shape(text: str) -> tuple[int, ...]:
    """``'B,C,H,W'`` or ``'B,N,C'`` -> a tuple of positive ints."""
    try:
        shape = tuple(int(s) for s in text.replace('x', ',').split(','))
    except ValueError:
        raise ValueError(f'--shape must be B,C,H,W (a block) or B,N,C (a mixer) of ints, got {text!r}') from None
    if len(shape) not in (3, 4) or min(shape) < 1:
        raise ValueError(f'--shape must be B,C,H,W (a block) or B,N,C (a mixer) of positive ints, got {text!r}')
    return shape


def _kind(name: str) -> tuple[str, str]:
    """``(kind, short name)``: ``attn:``/``mixer:`` pick the kind, else a block name wins over a mixer name."""
    kind, _, short = name.rpartition(':')
    if kind:
        registry.info(name)  # an unknown kind or name raises with the close matches
        return kind, short
    meta = registry.info(name)
    return meta.kind, name


def baseline_of(kind: str, name: str, shape: tuple[int, ...], heads: int, **dd: Any) -> tuple[str, nn.Module] | None:
    """The module ours is shown beside: ``full`` attention for a mixer, timm's module for a block timm has."""
    if kind == 'mixer':
        return 'full', registry.create_mixer('full', shape[-1], num_heads=heads, **dd)
    _, C, H, W = shape
    if name == 'poolformer':
        from timm.models.metaformer import Pooling

        return 'timm Pooling', Pooling(pool_size=3)
    timm_attn = importlib.import_module('timm.layers.create_attn')
    try:
        cls = timm_attn.get_attn(name)
    except (AssertionError, ValueError, KeyError):
        return None
    if cls is None:
        return None
    kwargs = dict(feat_size=(H, W)) if name in ('bottleneck', 'lambda', 'halo') else {}
    try:
        module = cls(C, **kwargs)
    except TypeError:
        module = cls(C)
    return f'timm {getattr(cls, "__name__", getattr(getattr(cls, "func", None), "__name__", name))}', \
        module.to(**dd)


def build_case(name: str, shape: tuple[int, ...] | None, heads: int, device: str, dtype: torch.dtype,
               ) -> tuple[str, nn.Module, tuple[str, nn.Module] | None, torch.Tensor]:
    """``(kind, ours, baseline, input)`` for ``name`` at ``shape`` (default: [8, 64, 56, 56] for a block,
    [1, 1024, 256] for a mixer)."""
    kind, short = _kind(name)
    if kind == 'ffn':
        raise ValueError(f'{name!r} is a feed-forward layer; visattn bench times blocks and mixers')
    shape = DEFAULT_SHAPE[kind] if shape is None else shape
    want = 4 if kind == 'attn' else 3
    if len(shape) != want:
        raise ValueError(f'--shape of the {"block" if kind == "attn" else "mixer"} {short!r} must be '
                         f'{"B,C,H,W" if kind == "attn" else "B,N,C"}, got {",".join(map(str, shape))}')
    dd = dict(device=device, dtype=dtype)
    if kind == 'attn':
        ours = registry.create_attn(short, shape[1], **dd)
    else:
        ours = registry.create_mixer(short, shape[-1], num_heads=heads, **length_kwargs(short, shape[1]), **dd)
    x = torch.randn(shape, **dd)
    return kind, ours, baseline_of(kind, short, shape, heads, **dd), x


def _step(module: nn.Module, x: torch.Tensor, backward: bool) -> Callable[[], None]:
    if backward:
        xg = x.detach().clone().requires_grad_(True)

        def run() -> None:
            module.zero_grad(set_to_none=True)
            xg.grad = None
            module(xg).float().square().mean().backward()
    else:
        def run() -> None:
            with torch.inference_mode():
                module(x)
    return run


def _sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def _proc_status_kib(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise OSError(f'{field} not in /proc/self/status')


def _peak_memory(fn: Callable[[], None], device: str) -> int | None:
    """Bytes of one call's high-water mark above what was in use before it (see the module docstring)."""
    if device.startswith('cuda'):
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated() - before
    # Linux: hand freed heap memory back (malloc_trim), reset the resident-set high-water mark (clear_refs 5),
    # then the call's peak is VmHWM after it minus VmRSS before it
    try:
        import ctypes

        gc.collect()
        ctypes.CDLL(None).malloc_trim(0)
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        before = _proc_status_kib('VmRSS')
        fn()
        return (_proc_status_kib('VmHWM') - before) * 1024
    except (OSError, AttributeError):
        return None


def bench(name: str, shape: tuple[int, ...] | None = None, *, heads: int = 8, device: str = 'cpu',
          dtype: str | torch.dtype = 'float32', backward: bool = False, repeats: int = 10, warmup: int = 2,
          progress: bool = True) -> BenchResult:
    """Time (minimum and median over ``repeats``, in ms) and peak memory (MiB) of ``name`` and its baseline.

    Args:
        name: a block or mixer (``'attn:<name>'`` / ``'mixer:<name>'`` where both kinds have the name).
        shape: ``(B, C, H, W)`` for a block, ``(B, N, C)`` for a mixer (defaults in ``DEFAULT_SHAPE``).
        heads: heads of a mixer (and of its ``full`` baseline).
        device: ``'cpu'`` or ``'cuda'`` (``'cuda:1'``).
        dtype: ``'float32'``, ``'bfloat16'``, ``'float16'`` or ``'float64'``.
        backward: time forward and backward (of the mean square of the output) instead of forward only.
        repeats: timed calls of each module; warmup: untimed calls first.
        progress: a progress bar on stderr.
    """
    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f'dtype must be one of {", ".join(DTYPES)}, got {dtype!r}')
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f'device={device!r}: no CUDA device is available here')
    if not device.startswith(('cpu', 'cuda')):
        raise ValueError(f'device must be cpu or cuda, got {device!r}')
    for arg, value, low in (('repeats', repeats, 1), ('warmup', warmup, 0), ('heads', heads, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f'{arg} must be an int >= {low}, got {value!r}')
    kind, ours, base, x = build_case(name, shape, heads, device, dtype)
    modules = {'ours': ours} | ({base[0]: base[1]} if base is not None else {})
    steps = {}
    for label, module in modules.items():
        module.train(backward)
        steps[label] = _step(module, x, backward)
        try:
            for _ in range(warmup):
                steps[label]()
        except Exception as e:  # a baseline that cannot run this shape (timm's halo needs multiples of its block)
            if label == 'ours':
                raise
            steps.pop(label)
            modules[label] = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
    times: dict[str, list[float]] = {label: [] for label in steps}
    bar = _progress(repeats * len(steps), progress, f'{name} {"fwd+bwd" if backward else "fwd"}')
    for _ in range(repeats):
        for label, fn in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[label].append((time.perf_counter() - t0) * 1e3)
            bar(1)
    bar(0, close=True)
    result: BenchResult = dict(name=name, kind=kind, shape=list(x.shape), dtype=str(dtype).removeprefix('torch.'),
                               device=device, mode='fwd+bwd' if backward else 'fwd', repeats=repeats,
                               threads=torch.get_num_threads(), results={})
    for label, module in modules.items():
        if label not in steps:
            result['results'][label] = dict(error=module)
            continue
        peak = _peak_memory(steps[label], device)
        ts = times[label]
        result['results'][label] = dict(
            module=type(module).__name__, min_ms=min(ts), median_ms=statistics.median(ts),
            peak_mib=None if peak is None else peak / 2 ** 20)
    if base is not None and base[0] in steps:
        ours_r, base_r = result['results']['ours'], result['results'][base[0]]
        result['ratio_min'] = ours_r['min_ms'] / base_r['min_ms']
        result['ratio_median'] = ours_r['median_ms'] / base_r['median_ms']
    return result


def _progress(total: int, enabled: bool, desc: str) -> Callable[..., None]:
    if not enabled:
        return lambda n, close=False: None
    try:
        from tqdm import tqdm
    except ImportError:
        return lambda n, close=False: None
    bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)

    def update(n: int, close: bool = False) -> None:
        bar.update(n)
        if close:
            bar.close()
    return update


def format_result(r: BenchResult) -> str:
    """The result as a small table."""
    lines = [f'{r["name"]} ({"block" if r["kind"] == "attn" else "mixer"}) {r["mode"]} {r["dtype"]} on {r["device"]}, '
             f'input {list(r["shape"])}, {r["repeats"]} repeats, {r["threads"]} threads',
             f'{"":<24} {"min ms":>10} {"median ms":>10} {"peak MiB":>10}']
    for label, v in r['results'].items():
        if 'error' in v:
            lines.append(f'{label:<24} cannot run this input: {v["error"]}')
            continue
        peak = '-' if v['peak_mib'] is None else f'{v["peak_mib"]:.1f}'
        lines.append(f'{label:<24} {v["min_ms"]:>10.3f} {v["median_ms"]:>10.3f} {peak:>10}')
    if 'ratio_min' in r:
        lines.append(f'ours / baseline: {r["ratio_min"]:.2f} by minimum, {r["ratio_median"]:.2f} by median '
                     '(below 1 = faster)')
    elif len(r['results']) == 1:
        lines.append('no baseline: timm has no module of this name')
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog='visattn bench', description=__doc__.split('\n\n')[0])
    p.add_argument('name', help='a block or mixer name (attn:<name> / mixer:<name> where both exist)')
    p.add_argument('--shape', type=str, default=None, help='B,C,H,W for a block, B,N,C for a mixer')
    p.add_argument('--heads', type=int, default=8, help='heads of a mixer (default 8)')
    p.add_argument('--device', default='cpu', help='cpu or cuda')
    p.add_argument('--dtype', default='float32', choices=list(DTYPES))
    p.add_argument('--backward', action='store_true', help='time forward + backward')
    p.add_argument('--repeats', type=int, default=10)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s)')
    p.add_argument('--json', action='store_true', help='print the result as JSON')
    p.add_argument('--no-progress', action='store_true')
    args = p.parse_args(argv)
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f'--threads must be >= 1, got {args.threads}')
            torch.set_num_threads(args.threads)
        shape = None if args.shape is None else parse_shape(args.shape)
        r = bench(args.name, shape, heads=args.heads, device=args.device, dtype=args.dtype, backward=args.backward,
                  repeats=args.repeats, warmup=args.warmup, progress=not (args.no_progress or args.json))
    except (KeyError, ValueError) as e:
        print(f'visattn bench: error: {e}', file=sys.stderr)
        return 2
    print(json.dumps(r, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v))
          if args.json else format_result(r))
    return 0
