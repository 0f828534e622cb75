"""Every Triton kernel of visattn.ops compiled offline for a Hopper GPU (sm_90) at the launch settings its op picks:
Triton's front end, LLVM and ptxas run on the CPU, so a kernel that the interpreter accepts but the compiler
rejects, that needs more shared memory than a block has, or that spills registers (beyond the spills listed in
``benchmarks/kernel_resources.py``) fails here. Slow (about a minute): run with ``-m slow``."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip('triton')

TOOL = Path(__file__).parents[2] / 'benchmarks' / 'kernel_resources.py'


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    out = subprocess.run([sys.executable, str(TOOL), '--check'], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert 'PROBLEM' not in out.stdout
