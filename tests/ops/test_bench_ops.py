"""The GPU benchmark's code path (cases, check against the PyTorch path, timing, the written table) run once in
Triton's interpreter, so that a session with a GPU spends its time measuring, not debugging the script."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip('triton')

SCRIPT = Path(__file__).resolve().parents[2] / 'benchmarks' / 'bench_ops.py'
OPS = ['linear_attention', 'linear_attention causal', 'local_attention_1d', 'neighborhood_attention_2d',
       'criss_cross_attention', 'halo_attention_2d', 'channel_gate']


def test_bench_ops_table_in_the_interpreter(tmp_path):
    out = tmp_path / 'ops.md'
    env = dict(os.environ, TRITON_INTERPRET='1')
    subprocess.run([sys.executable, str(SCRIPT), '--device', 'cpu', '--quick', '--kernels', '--repeats', '1',
                    '--threads', '1', '--out', str(out)], check=True, env=env, capture_output=True, timeout=300)
    rows = [line.split('|')[1:-1] for line in out.read_text().splitlines() if line.startswith('| ') and
            not line.startswith('| op ')]
    names = [cells[0].strip() for cells in rows]
    for op in OPS:
        assert any(name.startswith(op) for name in names), (op, names)
    for cells in rows:
        kernel_ms, max_err = cells[2].strip(), float(cells[-1])
        assert kernel_ms != '–' and max_err < 1e-4, cells  # every kernel ran and agrees with the PyTorch path
