"""timm's own model tests (``tests/test_models.py`` of timm's sdist) over visattn's models, through
``tools/timm_suite.py``. The default run takes every test function on a model of every block family and on the ViTs
of three mixers that reach timm's ViT by different paths (a plain mixer, a grid mixer, a mixer built for one
sequence length); the slow run takes a ViT of every mixer family, and every model.

Why three mixer ViTs are enough by default: every visattn mixer is a leaf of timm's ``torch.fx`` tracer (so a traced
ViT calls it as a module, whichever it is), every mixer is scripted and compared with eager on its own
(``tests/mixers/test_mixers_script.py``), and every registered ViT builds, runs forward and backward and returns
its features in ``tests/models/test_models.py``. What differs between the mixer ViTs is the ViT builder's path,
which the three cover.

``.ci/run`` fetches the sdist; under ``CI=true`` a missing sdist fails the test instead of skipping it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import visattn
from visattn.registry import _ENTRIES

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location('timm_suite', ROOT / 'tools' / 'timm_suite.py')
timm_suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(timm_suite)

# timm's tests that load published weights over the network (none is reachable in CI, and the visattn ViTs reuse
# timm's ViT-S weights); every other test function of the suite runs.
NEEDS_NETWORK = 'not test_model_load_pretrained'

# one backbone per 2-D block family (the cheapest)
BLOCK_SAMPLE = ['resnet18_se', 'resnet18_cbam', 'resnet18_gc', 'sasa_resnet26']
# the ViTs of the default run: a plain mixer, a grid mixer, a mixer built for one sequence length
MIXER_SAMPLE = ['vit_small_patch16_224_full', 'vit_small_patch16_224_poolformer',
                'vit_small_patch16_224_synthesizer_dense']
# the tests whose cost grows with depth x taps run on one ResNet-18 and on one ViT only
HEAVY = 'test_prune_intermediate_layers_contract or test_model_forward_intermediates'


def mixer_sample() -> list[str]:
    """Per mixer family its first mixer (by name) in a ViT-S/16."""
    first: dict[str, str] = {}
    for name, (_, meta) in sorted(_ENTRIES['mixer'].items()):
        first.setdefault(meta.family, name)
    return [f'vit_small_patch16_224_{m}' for m in first.values()]


def _require_sdist() -> None:
    if not timm_suite.sdist_path().exists():
        if os.environ.get('CI', '').lower() == 'true':
            pytest.fail(f"timm's sdist is missing at {timm_suite.sdist_path()}; .ci/run fetches it")
        pytest.skip("timm's sdist is not cached; run `python tools/timm_suite.py --fetch`")


def _run(models: list[str], expr: str) -> None:
    cmd = [sys.executable, str(ROOT / 'tools' / 'timm_suite.py'), '--models', ','.join(models), '--',
           '--tb=short', '-x', '-k', expr]  # quiet already: the harness passes -q
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    summary = re.findall(r'^=* ?(\d+ passed.*)$', proc.stdout, flags=re.M)
    assert summary and 'failed' not in summary[-1], proc.stdout[-2000:]


def test_sample_covers_every_family() -> None:
    models = set(visattn.list_models())
    assert set(BLOCK_SAMPLE) | set(MIXER_SAMPLE) | set(mixer_sample()) <= models
    assert len(mixer_sample()) == len({meta.family for _, meta in _ENTRIES['mixer'].values()})
    kinds = [visattn.get_mixer(m.removeprefix('vit_small_patch16_224_')).attn_info for m in MIXER_SAMPLE]
    assert [(i.requires_grid, i.requires_seq_len) for i in kinds] == [(False, False), (True, False), (False, True)]


# one test per model, so that a parallel run (pytest -n) spreads them over its workers
@pytest.mark.parametrize('model', BLOCK_SAMPLE)
def test_timm_suite_blocks_sample(model: str) -> None:
    _require_sdist()
    heavy = model == BLOCK_SAMPLE[0]
    _run([model], NEEDS_NETWORK if heavy else f'{NEEDS_NETWORK} and not ({HEAVY})')


@pytest.mark.parametrize('model', MIXER_SAMPLE)
def test_timm_suite_mixers_sample(model: str) -> None:
    _require_sdist()
    heavy = model == MIXER_SAMPLE[0]
    _run([model], NEEDS_NETWORK if heavy else f'{NEEDS_NETWORK} and not ({HEAVY})')


@pytest.mark.slow
@pytest.mark.parametrize('model', sorted(set(mixer_sample()) - set(MIXER_SAMPLE)))
def test_timm_suite_mixer_families(model: str) -> None:
    _require_sdist()
    _run([model], f'{NEEDS_NETWORK} and not ({HEAVY})')


@pytest.mark.slow
def test_timm_suite_every_model() -> None:
    _require_sdist()
    _run(visattn.list_models(), NEEDS_NETWORK)


def test_prepared_suite_extends_timm_lists(tmp_path: Path) -> None:
    _require_sdist()
    test = timm_suite.prepare(tmp_path).read_text()
    # every module of visattn.models that registers models (each file but the builder) extends timm's list
    files = sorted(p.stem for p in (ROOT / 'visattn' / 'models').glob('*.py') if not p.stem.startswith('_'))
    assert {'resnet', 'vit', 'nat'} <= set(files)
    assert f'FEAT_INTER_FILTERS = {files!r} + [' in test
    assert 'EXCLUDE_JIT_FILTERS = ' in test
    proc = subprocess.run(
        [sys.executable, str(ROOT / 'tools' / 'timm_suite.py'), '--models', 'resnet18_se', '--', '--co'],
        capture_output=True, text=True, cwd=ROOT)
    collected = [line for line in proc.stdout.splitlines() if '::' in line]
    assert collected and all('resnet18_se' in line for line in collected)
    assert {line.split('::')[1].split('[')[0] for line in collected} >= {
        'test_model_forward', 'test_model_backward', 'test_model_default_cfgs', 'test_model_forward_torchscript',
        'test_model_forward_fx', 'test_model_backward_fx', 'test_model_forward_intermediates'}
