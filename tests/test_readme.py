"""Every fenced Python and shell snippet of the README runs, on its own, so that none can rot.

Python snippets run one by one in a fresh interpreter (each must import what it uses), in a folder that holds the
small files a snippet names (``vit_small_patch16_224.safetensors``: random ViT-S weights in timm's layout).

Shell snippets, line by line (``\\`` continues a line; ``#`` starts a comment):
- ``visattn ...`` commands run (``visattn list --markdown`` is `test_registry`'s: it compares the output with the
  README's tables), in a folder holding the files they name (``photo.jpg``, a checkpoint at
  ``output/run/best.safetensors``); ``visattn bench`` with ``--repeats 1 --warmup 0`` added, for time;
- ``train.py`` / ``visattn train`` / ``torchrun ... train.py`` lines whose data cannot exist here (``/path/to/...``,
  several GPUs) have their options and recipe checked by ``train.py``'s own parser, which is what a typo breaks;
  the others (``visattn train --list-configs``, ``-c demo``) run;
- ``python <script>`` lines of the repository's tools run with ``--help``;
- the installation and the test command (``python3 -m venv``, ``pip install``, ``python -m pytest``) are what CI
  runs on a fresh machine (``.ci/run``), so they are checked to be exactly that and not run again here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()
FENCE = re.compile(r'^```(python|bash)\n(.*?)^```', re.M | re.S)


def _snippets(lang: str) -> list[tuple[int, str]]:
    return [(README[:m.start()].count('\n') + 1, m.group(2)) for m in FENCE.finditer(README) if m.group(1) == lang]


def _commands() -> list[tuple[int, str]]:
    """The shell lines of every bash snippet: continuations joined, comments dropped, ``&&`` chains split."""
    out = []
    for line0, text in _snippets('bash'):
        joined = re.sub(r'\\\n\s*', ' ', text)
        for k, raw in enumerate(joined.splitlines()):
            cmd = raw.split(' #')[0].strip() if not raw.lstrip().startswith('#') else ''
            for part in (p.strip() for p in cmd.split('&&')):
                if part:
                    out.append((line0 + 1 + k, part))
    return out


@pytest.fixture(scope='module')
def workdir(tmp_path_factory) -> Path:
    """A folder with the files the snippets name."""
    import timm
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    import visattn  # noqa: F401

    d = tmp_path_factory.mktemp('readme')
    torch.manual_seed(0)
    vit = timm.create_model('vit_small_patch16_224')
    save_file(vit.state_dict(), str(d / 'vit_small_patch16_224.safetensors'))
    (d / 'output' / 'run').mkdir(parents=True)
    (d / 'output' / 'resnet50_cbam-folder').mkdir()  # what --resume names
    save_file(timm.create_model('resnet50_cbam').state_dict(), str(d / 'output' / 'run' / 'best.safetensors'))
    Image.fromarray((torch.rand(96, 128, 3) * 255).byte().numpy()).save(d / 'photo.jpg')
    return d


def _env() -> dict[str, str]:
    return {**os.environ, 'PYTHONPATH': str(ROOT), 'MPLBACKEND': 'Agg'}


PYTHON = _snippets('python')


@pytest.mark.parametrize('line, code', PYTHON, ids=[f'line{n}' for n, _ in PYTHON])
def test_python_snippet_runs_on_its_own(line, code, workdir):
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=workdir, env=_env(),
                          timeout=600)
    assert proc.returncode == 0, f'README line {line}:\n{proc.stderr[-3000:]}'


def _kind(cmd: str) -> str:
    words = shlex.split(cmd)
    if words[:3] == ['python3', '-m', 'venv'] or words[:1] == ['.'] or words[:2] == ['pip', 'install'] \
            or words[:3] == ['python', '-m', 'pytest']:
        return 'install'
    if 'train.py' in words or words[:2] == ['visattn', 'train']:
        return 'train'
    if words[0] == 'visattn':
        return 'visattn'
    if words[0] == 'python' and words[1].endswith('.py'):
        return 'script'
    return 'unknown'


COMMANDS = _commands()


def test_every_shell_line_is_understood():
    unknown = [f'line {n}: {c}' for n, c in COMMANDS if _kind(c) == 'unknown']
    assert not unknown, unknown


def test_install_and_test_lines_are_what_ci_runs():
    ci = (ROOT / '.ci' / 'run').read_text()
    for n, cmd in COMMANDS:
        if _kind(cmd) != 'install':
            continue
        words = shlex.split(cmd)
        if words[:2] == ['pip', 'install'] or words[:3] == ['python', '-m', 'pytest']:
            assert cmd in ci, f'README line {n}: {cmd!r} is not what .ci/run runs'


TRAIN = [(n, c) for n, c in COMMANDS if _kind(c) == 'train']
VISATTN = [(n, c) for n, c in COMMANDS if _kind(c) == 'visattn']
SCRIPTS = [(n, c) for n, c in COMMANDS if _kind(c) == 'script']


def _train_args(cmd: str) -> list[str]:
    words = shlex.split(cmd)
    start = words.index('train.py') + 1 if 'train.py' in words else words.index('train') + 1
    return words[start:]


@pytest.mark.parametrize('line, cmd', TRAIN, ids=[f'line{n}' for n, _ in TRAIN])
def test_train_lines(line, cmd, workdir, tmp_path, monkeypatch):
    args = _train_args(cmd)
    needs_data = any('/path/to/' in a for a in args) or cmd.startswith('torchrun') or args == []
    if not needs_data:
        if '--output' in args:
            args[args.index('--output') + 1] = str(tmp_path / 'runs')
        proc = subprocess.run([sys.executable, str(ROOT / 'train.py'), *args, '--progress', 'false', '--plot',
                               'false'], capture_output=True, text=True, cwd=workdir, env=_env(), timeout=600)
        assert proc.returncode == 0, f'README line {line}: {cmd}\n{proc.stderr[-3000:]}'
        return
    from visattn.engine import parse_args

    monkeypatch.chdir(workdir)
    parse_args(args)  # a wrong option, value or recipe raises ConfigError naming it


@pytest.mark.parametrize('line, cmd', VISATTN, ids=[f'line{n}' for n, _ in VISATTN])
def test_visattn_lines_run(line, cmd, workdir):
    words = shlex.split(cmd)
    if words[1:3] == ['list', '--markdown']:  # builds every model; test_registry compares its output with the README
        from visattn.cli import markdown_tables  # noqa: F401  (the function that test runs)
        return
    if words[1] == 'bench':
        words += ['--repeats', '1', '--warmup', '0', '--no-progress'] if '--json' not in words else \
            ['--repeats', '1', '--warmup', '0']
    proc = subprocess.run([sys.executable, '-m', 'visattn.cli', *words[1:]], capture_output=True, text=True,
                          cwd=workdir, env=_env(), timeout=600)
    assert proc.returncode == 0, f'README line {line}: {cmd}\n{proc.stderr[-3000:]}'


@pytest.mark.parametrize('line, cmd', SCRIPTS, ids=[f'line{n}' for n, _ in SCRIPTS])
def test_script_lines_name_real_scripts(line, cmd):
    words = shlex.split(cmd)
    proc = subprocess.run([sys.executable, str(ROOT / words[1]), '--help'], capture_output=True, text=True,
                          cwd=ROOT, env=_env(), timeout=120)
    assert proc.returncode == 0, f'README line {line}: {words[1]} --help failed:\n{proc.stderr[-2000:]}'
    if len(words) > 2 and words[2] != '--':
        options = [w.split('=')[0] for w in words[2:] if w.startswith('--')]
        for opt in options:
            if opt == '--':
                break
            assert opt in proc.stdout, f'README line {line}: {words[1]} has no option {opt}'
