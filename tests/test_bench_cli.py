"""``visattn bench``: figures for a block beside timm's module and a mixer beside ``full``, a peak memory that sees
what a call allocates, and one-line errors for bad input."""

from __future__ import annotations

import json
import sys

import pytest

from visattn import bench
from visattn.cli import main


def _json(capsys, *argv: str) -> dict:
    assert main(['bench', *argv, '--json']) == 0
    return json.loads(capsys.readouterr().out)


def test_block_beside_timm_and_mixer_beside_full(capsys):
    r = _json(capsys, 'se', '--shape', '2,16,5,7', '--repeats', '2', '--warmup', '0')
    assert r['kind'] == 'attn' and r['shape'] == [2, 16, 5, 7] and r['mode'] == 'fwd'
    assert set(r['results']) == {'ours', 'timm SEModule'}
    for v in r['results'].values():
        assert 0 < v['min_ms'] <= v['median_ms']
    assert r['ratio_min'] == pytest.approx(r['results']['ours']['min_ms'] / r['results']['timm SEModule']['min_ms'])
    r = _json(capsys, 'performer', '--shape', '1,33,16', '--heads', '2', '--backward', '--repeats', '1')
    assert r['kind'] == 'mixer' and r['mode'] == 'fwd+bwd' and set(r['results']) == {'ours', 'full'}
    r = _json(capsys, 'mixer:poolformer', '--shape', '1,17,16', '--repeats', '1')  # a grid mixer: 1 + 4x4 tokens
    assert r['kind'] == 'mixer' and r['results']['ours']['module'] == 'PoolGridMixer'
    r = _json(capsys, 'simam', '--shape', '1,4,6,6', '--repeats', '1')
    assert set(r['results']) == {'ours'} and 'ratio_min' not in r


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='the CPU peak is measured through /proc')
def test_cpu_peak_memory_sees_the_output():
    """A call of ``se`` at [4, 256, 64, 64] float32 must hold at least its 16 MiB output at its peak."""
    r = bench.bench('se', (4, 256, 64, 64), repeats=1, warmup=1, progress=False)
    peak = r['results']['ours']['peak_mib']
    assert 15 <= peak <= 80, peak


@pytest.mark.parametrize('argv, match', [
    (['se', '--shape', '1,2,3'], '--shape of the block'),
    (['performer', '--shape', '1,x,3'], '--shape must be'),
    (['perfomer'], "Did you mean 'performer'"),
    (['se', '--device', 'cuda:0'] if not __import__('torch').cuda.is_available() else ['se', '--device', 'tpu'],
     'device'),
    (['se', '--repeats', '0'], 'repeats'),
])
def test_errors_are_one_line(capsys, argv, match):
    assert main(['bench', *argv]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and match in err, err
