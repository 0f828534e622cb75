import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip('triton')


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_without_a_gpu():
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    script = Path(__file__).with_name('aot_compile.py')
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
