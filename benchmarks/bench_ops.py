"""Speed of the visattn.ops kernels: Triton against the PyTorch path (and FlexAttention where the pattern fits).

    python benchmarks/bench_ops.py                       # on a CUDA GPU: check, time, write the table
    python benchmarks/bench_ops.py --device cpu          # the PyTorch paths on the CPU, same shapes
    python benchmarks/bench_ops.py --device cpu --quick  # small shapes, a smoke run
    TRITON_INTERPRET=1 python benchmarks/bench_ops.py --device cpu --quick --kernels --repeats 1
                                                         # the GPU table's code path, kernels interpreted

On a GPU each case is first checked (Triton output against the PyTorch path in float32), then timed as the
median of many runs with CUDA events after warm-up, on random data. The table gives the kernel's time, the
PyTorch path's, FlexAttention's for the local and neighbourhood patterns, the floor from REFERENCES.md (H100,
bytes that must move at ~3.0 TB/s), the kernel's time over that floor, and the bandwidth the kernel achieves
on those bytes. It is written with the GPU's name to ``benchmarks/results/ops_<gpu>.md``. Targets (issue 5,
H100): linear attention forward within 2× of its floor; 7×7 neighbourhood within 2× of its floor and faster
than FlexAttention; criss-cross at [2, 512, 97, 97] ≥ 5× faster than the PyTorch path; the channel gate
≥ 1.5× faster than eager PyTorch at [32, 256, 56, 56].
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import visattn.ops as ops
from visattn.ops.neighborhood import window_index


@dataclass
class Case:
    """One benchmark row: ``run(backend)`` calls the op; ``flex`` (optional) the same pattern in FlexAttention."""

    name: str
    shape: str
    run: Callable[[str], torch.Tensor]
    bytes_moved: int
    floor_us: float | None = None
    flex: Callable[[], torch.Tensor] | None = None
    inputs: list[torch.Tensor] = field(default_factory=list)


def _bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _randn(*shape: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=dtype)


def _flex_local(q, k, v, window: int):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    half = window // 2

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx - q_idx <= half) & (q_idx - kv_idx <= half)

    n = q.shape[2]
    block_mask = create_block_mask(mask_mod, None, None, n, n, device=q.device)
    flex = torch.compile(flex_attention)
    return lambda: flex(q, k, v, block_mask=block_mask)


def _flex_neighborhood(q, k, v, kernel_size: int, rpb):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    b, h, hs, ws, d = q.shape
    start_y = window_index(hs, kernel_size, 1, q.device)[:, 0]
    start_x = window_index(ws, kernel_size, 1, q.device)[:, 0]

    def mask_mod(b_, h_, q_idx, kv_idx):
        qy, qx, ky, kx = q_idx // ws, q_idx % ws, kv_idx // ws, kv_idx % ws
        dy, dx = ky - start_y[qy], kx - start_x[qx]
        return (dy >= 0) & (dy < kernel_size) & (dx >= 0) & (dx < kernel_size)

    def score_mod(score, b_, h_, q_idx, kv_idx):
        qy, qx, ky, kx = q_idx // ws, q_idx % ws, kv_idx // ws, kv_idx % ws
        return score + rpb[h_, ky - qy + kernel_size - 1, kx - qx + kernel_size - 1].float()

    block_mask = create_block_mask(mask_mod, None, None, hs * ws, hs * ws, device=q.device)
    flex = torch.compile(flex_attention)
    qf, kf, vf = (t.flatten(2, 3) for t in (q, k, v))
    return lambda: flex(qf, kf, vf, score_mod=score_mod, block_mask=block_mask)


def _try_flex(builder: Callable[..., Callable[[], torch.Tensor] | None], *args) -> Callable[[], torch.Tensor] | None:
    """FlexAttention's callable for a pattern, or None (with a note) where this PyTorch cannot build it."""
    try:
        return builder(*args)
    except Exception as e:  # noqa: BLE001
        print(f'  FlexAttention unavailable for {builder.__name__}: {type(e).__name__}: {e}')
        return None


def build_cases(device: str, dtype: torch.dtype, quick: bool, with_flex: bool) -> list[Case]:
    dd = dict(device=device, dtype=dtype)
    cases = []
    for n, floor in ((4096, 45.0), (16384, 180.0)):
        if quick:
            n, floor = n // 16, None
        b, h, d = (2, 2, 64) if quick else (8, 8, 64)
        q, k = (_randn(b, h, n, d, **dd).sigmoid() for _ in range(2))
        v = _randn(b, h, n, d, **dd)
        for causal in (False, True):
            cases.append(Case(
                f'linear_attention{" causal" if causal else ""}', f'[{b}, {h}, {n}, {d}]',
                lambda be, q=q, k=k, v=v, c=causal: ops.linear_attention(q, k, v, causal=c, backend=be),
                _bytes(q, k, v, v), None if causal else floor, inputs=[q, k, v]))
    b, h, n, d, window = (2, 2, 512, 64, 65) if quick else (8, 8, 4096, 64, 257)
    q, k, v = (_randn(b, h, n, d, **dd) for _ in range(3))
    cases.append(Case(
        f'local_attention_1d w={window}', f'[{b}, {h}, {n}, {d}]',
        lambda be, q=q, k=k, v=v: ops.local_attention_1d(q, k, v, window=window, backend=be), _bytes(q, k, v, v),
        flex=_try_flex(_flex_local, q, k, v, window) if with_flex else None, inputs=[q, k, v]))
    # NAT-T stage 1 (56×56, 2 heads of 32) at batch 128: the shape whose bytes give REFERENCES' ~68 µs floor
    b, h, hs, d, ks = (2, 2, 28, 32, 7) if quick else (128, 2, 56, 32, 7)
    q, k, v = (_randn(b, h, hs, hs, d, **dd) for _ in range(3))
    rpb = _randn(h, 2 * ks - 1, 2 * ks - 1, **dd)
    cases.append(Case(
        f'neighborhood_attention_2d {ks}×{ks} +rpb', f'[{b}, {h}, {hs}, {hs}, {d}]',
        lambda be, q=q, k=k, v=v: ops.neighborhood_attention_2d(q, k, v, kernel_size=ks, rpb=rpb,
                                                                           backend=be), _bytes(q, k, v, v),
        None if quick else 68.0, flex=_try_flex(_flex_neighborhood, q, k, v, ks, rpb) if with_flex else None,
        inputs=[q, k, v, rpb]))
    # CCNet at [2, 512, 97, 97]: q, k reduced to C/8 = 64, v at 512 channels, one head, no scaling
    b, c, hs = (1, 128, 33) if quick else (2, 512, 97)
    q, k = (_randn(b, 1, hs, hs, c // 8, **dd) for _ in range(2))
    v = _randn(b, 1, hs, hs, c, **dd)
    cases.append(Case(
        'criss_cross_attention', f'[{b}, {c}, {hs}, {hs}]',
        lambda be, q=q, k=k, v=v: ops.criss_cross_attention(q, k, v, scale=1.0, backend=be), _bytes(q, k, v, v),
        None if quick else 38.0, inputs=[q, k, v]))
    # HaloNet stage (b = 8, h = 3, heads of 16) on a 64×64 map, with the factorised relative embeddings
    b, h, hs, d = (2, 2, 32, 16) if quick else (8, 8, 64, 16)
    q, k, v = (_randn(b, h, hs, hs, d, **dd) for _ in range(3))
    rel_h, rel_w = (_randn(2 * 14 - 1, d, **dd) for _ in range(2))
    cases.append(Case(
        'halo_attention_2d b=8 h=3 +rel', f'[{b}, {h}, {hs}, {hs}, {d}]',
        lambda be, q=q, k=k, v=v, rh=rel_h, rw=rel_w: ops.halo_attention_2d(q, k, v, block_size=8, halo_size=3,
                                                                            rel_h=rh, rel_w=rw, backend=be),
        _bytes(q, k, v, v), None, inputs=[q, k, v, rel_h, rel_w]))
    b, c, hs = (4, 64, 28) if quick else (32, 256, 56)
    x = _randn(b, c, hs, hs, **dd)
    w1, b1 = torch.randn(c // 16, c, device=device) * 0.1, torch.zeros(c // 16, device=device)
    w2, b2 = torch.randn(c, c // 16, device=device) * 0.1, torch.zeros(c, device=device)
    cases.append(Case(
        'channel_gate (SE, r=16)', f'[{b}, {c}, {hs}, {hs}]',
        lambda be: ops.channel_gate(x, w1, b1, w2, b2, backend=be), 3 * _bytes(x), None if quick else 51.0,
        inputs=[x, w1, b1, w2, b2]))
    return cases


def time_ms(fn: Callable[[], object], device: str, repeats: int, warmup: int) -> float:
    """Median time of ``fn`` in ms: CUDA events on a GPU, ``perf_counter`` on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == 'cuda':
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def check(case: Case) -> float:
    """Largest |Triton - PyTorch path| with the PyTorch path run in float32."""
    got = case.run('triton').float()
    saved = [t.data for t in case.inputs]
    for t in case.inputs:
        t.data = t.data.float()
    try:
        want = case.run('torch').float()
    finally:
        for t, s in zip(case.inputs, saved):
            t.data = s
    return (got - want).abs().max().item()


def _fmt(value: float | None, digits: int = 3) -> str:
    return '–' if value is None else f'{value:.{digits}f}'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', choices=['cuda', 'cpu'])
    parser.add_argument('--dtype', default=None, choices=['bf16', 'fp16', 'fp32'],
                        help='input dtype (default bf16 on a GPU, fp32 on the CPU)')
    parser.add_argument('--quick', action='store_true', help='small shapes, few repeats')
    parser.add_argument('--repeats', type=int, default=None)
    parser.add_argument('--no-flex', action='store_true', help='skip FlexAttention')
    parser.add_argument('--kernels', action='store_true', help='on the CPU, also check and time the Triton kernels '
                        '(needs TRITON_INTERPRET=1: a smoke run of the GPU table, not a measurement)')
    parser.add_argument('--threads', type=int, default=None, help='CPU threads (default: PyTorch\'s)')
    parser.add_argument('--out', type=Path, default=None, help='where to write the table (GPU default: '
                        'benchmarks/results/ops_<gpu>.md)')
    args = parser.parse_args()
    gpu = args.device == 'cuda'
    if gpu and not torch.cuda.is_available():
        raise SystemExit('--device cuda: no CUDA device visible; use --device cpu')
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}[
        args.dtype or ('bf16' if gpu else 'fp32')]
    repeats = args.repeats or (5 if args.quick else (100 if gpu else 3))
    warmup = 2 if args.quick or not gpu else 10
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = build_cases(args.device, dtype, args.quick, with_flex=gpu and not args.no_flex)
    name = torch.cuda.get_device_name() if gpu else f'CPU ({torch.get_num_threads()} threads)'
    lines = [f'# visattn.ops on {name}', '', f'dtype {str(dtype).removeprefix("torch.")}, forward, median of '
             f'{repeats} runs after {warmup} warm-up runs; floor: REFERENCES.md (H100)', '',
             '| op | shape | kernel ms | torch ms | flex ms | floor µs | kernel / floor | torch / kernel | '
             'GB/s | max err |', '|---|---|---|---|---|---|---|---|---|---|']
    kernels = gpu or args.kernels
    if not kernels:
        lines[-2:] = ['| op | shape | torch ms | GB/s |', '|---|---|---|---|']
    print('\n'.join(lines), flush=True)
    for case in cases:
        torch_ms = time_ms(lambda c=case: c.run('torch'), args.device, repeats, warmup)
        if not kernels:
            row = f'| {case.name} | {case.shape} | {torch_ms:.2f} | {case.bytes_moved / torch_ms / 1e6:.1f} |'
        else:
            err = check(case)
            kernel_ms = time_ms(lambda c=case: c.run('triton'), args.device, repeats, warmup)
            flex_ms = None
            if case.flex is not None:
                try:
                    flex_ms = time_ms(case.flex, args.device, repeats, warmup)
                except Exception as e:  # noqa: BLE001  FlexAttention may not compile this pattern here
                    print(f'  FlexAttention failed on {case.name}: {type(e).__name__}: {e}')
            ratio = kernel_ms * 1e3 / case.floor_us if case.floor_us else None
            row = (f'| {case.name} | {case.shape} | {kernel_ms:.4f} | {torch_ms:.4f} | {_fmt(flex_ms, 4)} | '
                   f'{_fmt(case.floor_us, 0)} | {_fmt(ratio, 2)} | {torch_ms / kernel_ms:.2f} | '
                   f'{case.bytes_moved / kernel_ms / 1e6:.0f} | {err:.2e} |')
        lines.append(row)
        print(row, flush=True)
    out = args.out
    if out is None and gpu and not args.quick:
        out = Path(__file__).parent / 'results' / f'ops_{re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")}.md'
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text('\n'.join(lines) + '\n')
        print(f'written {out}')


if __name__ == '__main__':
    main()
