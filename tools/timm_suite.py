"""Run timm's own model tests (``tests/test_models.py`` of timm's source distribution) over visattn's models.

The suite is used unchanged apart from three things:

- ``import visattn`` first, so that visattn's models are in timm's registry when the suite collects;
- the module names that visattn's models register under are added to ``FEAT_INTER_FILTERS`` (the list of
  timm modules whose models have ``forward_intermediates``), and the models that visattn declares not
  scriptable (``visattn.models.NOT_SCRIPTABLE``, each with its reason) to ``EXCLUDE_JIT_FILTERS``, the list
  timm excludes its own from TorchScript with;
- only visattn's models are selected (all of them, or the names given).

Usage::

    python tools/timm_suite.py --fetch                 # pip download timm's sdist for the installed version
    python tools/timm_suite.py                         # every timm test function, every visattn model
    python tools/timm_suite.py --models resnet18_cbam,sasa_resnet26 -- -k "forward_fx or torchscript"

The sdist is looked for in ``$VISATTN_TIMM_SDIST_DIR`` (default ``~/.cache/visattn/timm-sdist``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_DIR = Path(os.environ.get('VISATTN_TIMM_SDIST_DIR', Path.home() / '.cache' / 'visattn' / 'timm-sdist'))

_CONFTEST = '''
import fnmatch
import os

import visattn  # registers visattn's models with timm before the suite collects

_SELECTED = set(os.environ['VISATTN_TIMM_SUITE_MODELS'].split(','))


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, 'callspec', None), 'params', {})
        name = params.get('model_name')
        (keep if name is not None and name in _SELECTED else drop).append(item)
    items[:] = keep
    config.hook.pytest_deselected(items=drop)
'''


def timm_version() -> str:
    import timm

    return timm.__version__


def sdist_path(version: str | None = None) -> Path:
    """Where timm's sdist for ``version`` (default: the installed one) is cached."""
    return SDIST_DIR / f'timm-{version or timm_version()}.tar.gz'


def fetch(version: str | None = None) -> Path:
    """Download timm's sdist for ``version`` into the cache (a no-op when it is there)."""
    path = sdist_path(version)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '--no-binary', ':all:',
             f'timm=={version or timm_version()}', '-d', str(path.parent)], check=True)
    if not path.exists():
        raise FileNotFoundError(f'pip download did not produce {path}')
    return path


def prepare(dest: Path, version: str | None = None) -> Path:
    """Extract timm's test_models.py and conftest.py into ``dest`` with visattn's additions; returns the test file."""
    import visattn
    from visattn.models import NOT_SCRIPTABLE

    path = sdist_path(version)
    if not path.exists():
        raise FileNotFoundError(f"timm's sdist is not at {path}; run `python tools/timm_suite.py --fetch`")
    with tarfile.open(path) as tar:
        members = {Path(m.name).relative_to(Path(m.name).parts[0]).as_posix(): m for m in tar.getmembers()}
        test = tar.extractfile(members['tests/test_models.py']).read().decode()
        conftest = tar.extractfile(members['tests/conftest.py']).read().decode()
    from timm.models._registry import _model_to_module

    modules = sorted({_model_to_module[n].split('.')[-1] for n in visattn.list_models()})
    test, n = re.subn(r'^FEAT_INTER_FILTERS = \[', f'FEAT_INTER_FILTERS = {modules!r} + [', test, count=1, flags=re.M)
    if n != 1:
        raise RuntimeError("timm's test_models.py has no FEAT_INTER_FILTERS list to extend")
    jit = sorted(NOT_SCRIPTABLE)
    test, n = re.subn(r'^EXCLUDE_JIT_FILTERS = \[', f'EXCLUDE_JIT_FILTERS = {jit!r} + [', test, count=1, flags=re.M)
    if n != 1:
        raise RuntimeError("timm's test_models.py has no EXCLUDE_JIT_FILTERS list to extend")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / 'test_models.py').write_text(test)
    (dest / 'conftest.py').write_text(conftest + _CONFTEST)
    return dest / 'test_models.py'


def run(models: list[str] | None = None, pytest_args: list[str] = (), version: str | None = None) -> int:
    """Run the suite over ``models`` (default: every visattn model); returns pytest's exit code."""
    import visattn

    known = visattn.list_models()
    models = known if not models else models
    unknown = sorted(set(models) - set(known))
    if unknown:
        raise ValueError(f'not visattn models: {", ".join(unknown)}')
    with tempfile.TemporaryDirectory(prefix='visattn-timm-suite-') as tmp:
        test = prepare(Path(tmp), version)
        env = {'HF_HUB_OFFLINE': '1', **os.environ, 'VISATTN_TIMM_SUITE_MODELS': ','.join(models)}
        cmd = [sys.executable, '-m', 'pytest', str(test), '-q', '-p', 'no:cacheprovider', '--rootdir', tmp,
               '-W', 'ignore::pytest.PytestUnknownMarkWarning', *pytest_args]
        return subprocess.run(cmd, cwd=tmp, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if '--' in argv:
        i = argv.index('--')
        argv, extra = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--fetch', action='store_true', help="download timm's sdist into the cache and exit")
    parser.add_argument('--models', default='', help='comma-separated visattn model names (default: all)')
    args = parser.parse_args(argv)
    if args.fetch:
        print(fetch())
        return 0
    return run([m for m in args.models.split(',') if m], extra)


if __name__ == '__main__':
    sys.exit(main())
