"""Shared machinery of the CPU benchmarks: interleaved timing, forked fresh processes, and a per-call peak memory.

- `interleaved_times`: the functions are called in rounds (a, b, a, b, ...) after warm-up, so that a drift of a
  shared machine hits every side alike;
- `run_forked`: one case in a process forked from the parent (after torch is imported, before the parent runs any
  torch op), so that each case starts from its own memory high-water mark; a case that gives no result within the
  timeout, or whose process dies, is reported and skipped;
- `rss_now_kb` and `peak_rss_mib`: the resident set now, and the high-water mark of one call above the resident set
  before it (`visattn.bench`'s CPU measure: freed heap handed back, ``VmHWM`` reset through ``/proc/self/clear_refs``).
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import time
from collections.abc import Callable


def interleaved_times(fns: list[Callable[[], None]], repeats: int, warmup: int = 2) -> list[list[float]]:
    """Seconds of each call of each function, timed in ``repeats`` interleaved rounds after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return times


def median_and_min(times: list[float]) -> tuple[float, float]:
    return statistics.median(times), min(times)


def rss_now_kb() -> int:
    with open('/proc/self/statm') as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() // 1024


def peak_rss_mib(fn: Callable[[], None]) -> float | None:
    """MiB of one call's resident-set high-water mark above the resident set before it (Linux; else None)."""
    from visattn.bench import _peak_memory

    peak = _peak_memory(fn, 'cpu')
    return None if peak is None else max(0, peak) / 2 ** 20


def run_forked(target: Callable, spec: dict, timeout: float, label: str) -> dict | None:
    """``target(spec, conn)`` in a forked process; its dict, or None (printed) on an error, a timeout or a death.
    The target sends ``{'error': ...}`` for an exception it caught (see `guarded`)."""
    ctx = mp.get_context('fork')
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(spec, child))
    proc.start()
    child.close()
    try:
        result = parent.recv() if parent.poll(timeout) else {'error': f'no result within {timeout} s: skipped'}
    except EOFError:
        result = {'error': 'the process died (out of memory?)'}
    proc.join(1)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if 'error' in result:
        print(f'  ! {label}: {result["error"]}', flush=True)
        return None
    return result


def guarded(worker: Callable) -> Callable:
    """``worker(spec, conn)`` that sends ``{'error': ...}`` instead of raising, so that the benchmark goes on."""
    def run(spec: dict, conn) -> None:
        try:
            worker(spec, conn)
        except Exception as e:  # reported by the parent
            conn.send({'error': f'{type(e).__name__}: {e}'})
    run.__name__ = f'guarded_{worker.__name__}'
    return run
