"""Fault injection for the training tests: run ``train.py`` in forked processes that die at chosen instants.

    python _faults.py SPEC.json

``SPEC``: ``{"jobs": [{"argv": [...], "run_dir": "...", "plan": [[kind, value], ...]}, ...], "result": "out.json"}``.
Each step of a job's ``plan`` is one attempt, resumed (``--resume run_dir``) when the folder has a checkpoint, as
a user would: ``["after", k]`` dies right after the k-th file of the attempt is renamed into place (``os.replace``),
``["before", k]`` right before it (the temporary file complete, not yet renamed), ``["time", s]`` is SIGKILLed
``s`` seconds after it starts, ``["none", 0]`` runs to the end. A death by ``os._exit`` skips every ``finally``
and ``atexit``, as SIGKILL does. ``result`` receives, per job, ``[{"plan": step, "killed": bool, "status": int}, ...]``.

The processes are forked from this one after ``import visattn`` (no torch op has run here yet), which saves the
start-up of a fresh interpreter per attempt.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import visattn  # noqa: F401
from visattn.engine import checkpoint, cli

KILLED = 137


def _attempt(argv: list[str], run_dir: Path, kind: str, value: float) -> None:
    """The body of a forked attempt; never returns."""
    if kind in ('after', 'before'):
        real, count = os.replace, [0]

        def replace(src, dst, *args, **kwargs):
            count[0] += 1
            if kind == 'before' and count[0] == value:
                os._exit(KILLED)
            real(src, dst, *args, **kwargs)
            if kind == 'after' and count[0] == value:
                os._exit(KILLED)

        os.replace = replace
    resume = ['--resume', str(run_dir)] if (run_dir / checkpoint.MANIFEST).exists() else []
    try:
        code = cli([*argv, *resume])
    except BaseException:
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    Path(spec['result']).write_text(json.dumps([_job(**job) for job in spec['jobs']]))


def _job(argv: list[str], run_dir: str, plan: list[tuple[str, float]]) -> list[dict]:
    run_dir = Path(run_dir)
    results = []
    for kind, value in plan:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _attempt(argv, run_dir, kind, value)
        status = None
        if kind == 'time':
            deadline = time.monotonic() + value
            while status is None and time.monotonic() < deadline:
                done, code = os.waitpid(pid, os.WNOHANG)
                status = code if done else time.sleep(0.005)
            if status is None:
                os.kill(pid, signal.SIGKILL)
        if status is None:
            status = os.waitpid(pid, 0)[1]
        killed = os.WIFSIGNALED(status) or os.WEXITSTATUS(status) == KILLED
        results.append({'plan': [kind, value], 'killed': killed,
                        'status': -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)})
    return results


if __name__ == '__main__':
    main(sys.argv[1])
