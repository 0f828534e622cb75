"""``visattn train`` from a non-editable install of the wheel, run from a folder outside the repository: the
recipes ship inside the package, ``--list-configs`` names them, and a recipe given by name trains."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope='module')
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The wheel built from this checkout, installed (without its dependencies, which this interpreter has) into
    a folder of its own that comes first on ``sys.path``."""
    tmp = tmp_path_factory.mktemp('wheel')
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w',
                    str(tmp / 'dist'), str(ROOT)], check=True, capture_output=True, cwd=tmp)
    wheel = next((tmp / 'dist').glob('visattn-*.whl'))
    site = tmp / 'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', str(site), str(wheel)],
                   check=True, capture_output=True, cwd=tmp)
    env = {**os.environ, 'PYTHONPATH': str(site), 'PYTHONNOUSERSITE': '1'}
    return site, env


def _visattn(site: Path, env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    script = site / 'bin' / 'visattn'  # the console entry the wheel installs
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)


def test_wheel_ships_the_recipes_and_train_runs_outside_the_checkout(installed, tmp_path):
    site, env = installed
    where = subprocess.run([sys.executable, '-c', 'import visattn; print(visattn.__file__)'], capture_output=True,
                           text=True, env=env, cwd=tmp_path, check=True).stdout.strip()
    assert Path(where).is_relative_to(site), f'the installed copy was not the one imported: {where}'
    assert (site / 'visattn' / 'configs' / 'imagenet' / 'resnet50_cbam.yaml').is_file()

    listed = _visattn(site, env, tmp_path, 'train', '--list-configs')
    assert listed.returncode == 0, listed.stderr
    names = listed.stdout.split()
    assert {'demo', 'imagenet/resnet50_cbam', 'ade20k/ccnet_resnet50'} <= set(names)
    assert names == sorted(p.relative_to(ROOT / 'configs').with_suffix('').as_posix()
                           for p in (ROOT / 'configs').rglob('*.yaml'))

    done = _visattn(site, env, tmp_path, 'train', '-c', 'demo', '--epochs', '1', '--model', 'resnet18_se',
                    '--output', str(tmp_path / 'out'), '--experiment', 'demo', '--progress', 'false',
                    '--plot', 'false')
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / 'out' / 'demo' / 'summary.csv').is_file()

    wrong = _visattn(site, env, tmp_path, 'train', '-c', 'imagenet/resnet50_cbm', '--data-dir', str(tmp_path))
    assert wrong.returncode == 2
    assert wrong.stderr.count('\n') == 1 and 'imagenet/resnet50_cbam' in wrong.stderr, wrong.stderr
