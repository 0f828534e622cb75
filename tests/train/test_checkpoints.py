"""Crash-safe checkpoints: kills at any instant, damaged files, one run per folder."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

import visattn  # noqa: F401
from visattn.engine import CheckpointError, RunFolderError, RunLock, parse_args, run
from visattn.engine import rundir as rundir_module

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _data import make_image_folder  # noqa: E402

TINY = ['--model', 'test_resnet', '--img-size', '16', '--batch-size', '8', '--lr', '0.05', '--progress', 'false',
        '--plot', 'false', '--color-jitter', '0', '--hflip', '0', '--threads', '1', '--epochs', '3']
needs_fork = pytest.mark.skipif(not hasattr(os, 'fork'), reason='the fault injection forks')


@pytest.fixture(scope='module')
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('imgs'))


@pytest.fixture(scope='module')
def runs(folder, tmp_path_factory) -> dict[str, Path]:
    """``ref``: three epochs uninterrupted; ``cut``: the same run stopped after two (two checkpoints on disk)."""
    out = tmp_path_factory.mktemp('runs')
    common = ['--data-dir', str(folder), '--output', str(out), *TINY]
    run(parse_args([*common, '--experiment', 'ref']))
    run(parse_args([*common, '--experiment', 'cut', '--stop-after-epoch', '2']))
    return {'ref': out / 'ref', 'cut': out / 'cut', 'args': common}


def _at(path: Path) -> str:
    return re.escape(str(path))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / 'checkpoint.json').read_text())


def _assert_same_outputs(run_dir: Path, ref: Path) -> None:
    for name in ('last.safetensors', 'best.safetensors'):  # bit for bit (the metadata's order is safetensors')
        with safe_open(run_dir / name, 'pt') as got, safe_open(ref / name, 'pt') as want:
            assert got.metadata() == want.metadata() and set(got.keys()) == set(want.keys()), name
            for k in want.keys():
                a, b = got.get_tensor(k), want.get_tensor(k)
                assert a.dtype == b.dtype and a.numpy().tobytes() == b.numpy().tobytes(), (name, k)
    assert (run_dir / 'summary.csv').read_bytes() == (ref / 'summary.csv').read_bytes()
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith('.tmp')]
    assert not (run_dir / 'run.lock').exists()
    m = _manifest(run_dir)
    named = {e['name'] for r in (m['current'], m['previous']) for e in (*r['files'].values(), r['best'])}
    assert {p.name for p in run_dir.glob('ckpt-*')} == named  # nothing unreferenced left behind


def _faults(jobs: list[dict], tmp_path: Path, timeout: int) -> list[list[dict]]:
    spec, result = tmp_path / 'spec.json', tmp_path / 'result.json'
    spec.write_text(json.dumps({'jobs': jobs, 'result': str(result)}))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    res = subprocess.run([sys.executable, str(HERE / '_faults.py'), str(spec)], capture_output=True, text=True,
                         timeout=timeout, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(result.read_text())


def _fault_run(tmp_path: Path, argv_extra: list[str], plan: list, timeout: int) -> tuple[list, Path]:
    common = ['--output', str(tmp_path), *argv_extra]
    ref_job = {'argv': [*common, '--experiment', 'ref'], 'run_dir': str(tmp_path / 'ref'), 'plan': [['none', 0]]}
    # after the plan: run to the end, then once more (a finished run resumed changes nothing and leaves nothing)
    job = {'argv': [*common, '--experiment', 'cut'], 'run_dir': str(tmp_path / 'cut'),
           'plan': [*plan, ['none', 0], ['none', 0]]}
    ref, cut = _faults([ref_job, job], tmp_path, timeout)
    assert ref[0]['status'] == 0 and cut[-2]['status'] == 0 and cut[-1]['status'] == 0, (ref, cut)
    _assert_same_outputs(tmp_path / 'cut', tmp_path / 'ref')
    return cut[:-2], tmp_path / 'cut'


@needs_fork
def test_killed_at_file_writes_and_resumed_ends_bitwise_equal(folder, tmp_path):
    # killed right after the weights of epoch 1 are written (its state not yet), right
    # after the switch (before last/best point to it), with the next manifest complete but not renamed, and
    # at a random instant: each time resumed, and the end is the uninterrupted run, bit for bit
    plan = [['after', 2], ['after', 4], ['before', 7], ['time', random.Random(0).uniform(0.5, 2.0)]]
    attempts, _ = _fault_run(tmp_path, ['--data-dir', str(folder), *TINY], plan, timeout=240)
    assert all(a['killed'] for a in attempts[:3]), attempts
    assert sum(a['killed'] for a in attempts) >= 3


@pytest.mark.slow
@needs_fork
def test_demo_killed_20_times_ends_bitwise_equal(tmp_path):
    # three rounds of: right after each of the first 5 file writes of an attempt (the 5th is the manifest switch
    # of a resumed attempt, and so the only kill that lets the run advance by an epoch), right before 3 renames,
    # and at 2 random instants early in an attempt (set-up, loading, the first batches)
    rng = random.Random(12)
    plan = []
    for _ in range(3):
        for k in range(1, 6):
            plan += [['before', k]] if k in (2, 4, 5) else []
            plan += [['after', k]] + ([['time', rng.uniform(0.2, 3.0)]] if k in (2, 4) else [])
    attempts, _ = _fault_run(tmp_path, ['--epochs', '4', '--progress', 'false', '--plot', 'false'], plan,
                             timeout=1800)
    assert sum(a['killed'] for a in attempts) >= 20, attempts


def _flip(path: Path, offset: int, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + n] = bytes(b ^ 0xFF for b in data[offset:offset + n])
    path.write_bytes(bytes(data))


def _current(run_dir: Path, role: str) -> Path:
    return run_dir / _manifest(run_dir)['current']['files'][role]['name']


def test_corrupted_bytes_refused_then_fallback_resumes_to_the_same_weights(runs, tmp_path):
    run_dir = _copy(runs['cut'], tmp_path / 'cut')
    weights = _current(run_dir, 'weights')
    _flip(weights, weights.stat().st_size // 2)  # inside the tensor data, past the header
    (run_dir / '.state.pt.0123456789ab.tmp').write_bytes(b'left by a killed write')
    with pytest.raises(CheckpointError, match=rf'{_at(weights)}: corrupt: sha256 .*--resume-fallback'):
        run(parse_args([*runs['args'], '--resume', str(run_dir)]))
    run(parse_args([*runs['args'], '--resume', str(run_dir), '--resume-fallback']))
    _assert_same_outputs(run_dir, runs['ref'])
    assert not weights.exists()  # the damaged checkpoint is gone once a new one is complete


def test_truncated_and_missing_files_name_the_file(runs, tmp_path):
    run_dir = _copy(runs['cut'], tmp_path / 'cut')
    state = _current(run_dir, 'state')
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=rf'{_at(state)}: truncated or damaged: 1000 bytes'):
        run(parse_args([*runs['args'], '--resume', str(run_dir)]))
    state.unlink()
    with pytest.raises(CheckpointError, match=rf'{_at(state)}: missing \(named in checkpoint.json\)'):
        run(parse_args([*runs['args'], '--resume', str(run_dir)]))


def _replace(run_dir: Path, role: str, data: bytes) -> Path:
    """Write ``data`` as the current ``role`` file and record its sha256, as a faulty writer would have."""
    m = _manifest(run_dir)
    entry = m['current']['files'][role]
    (run_dir / entry['name']).unlink()
    (run_dir / entry['name']).write_bytes(data)
    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    if role == 'weights':
        m['current']['best'] = entry
    (run_dir / 'checkpoint.json').write_text(json.dumps(m))
    return run_dir / entry['name']


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_missing_entries_nan_and_shapes_are_one_line_naming_file_and_entry(runs, tmp_path):
    resume = [*runs['args'], '--resume']
    run_dir = _copy(runs['cut'], tmp_path / 'a')
    state = torch.load(_current(run_dir, 'state'), weights_only=True)
    del state['optimizer']
    path = _replace(run_dir, 'state', _torch_bytes(state))
    with pytest.raises(CheckpointError, match=rf"^{_at(path)}: missing entry 'optimizer'"):
        run(parse_args([*resume, str(run_dir)]))

    run_dir = _copy(runs['cut'], tmp_path / 'b')
    weights = load_safetensors(_current(run_dir, 'weights').read_bytes())
    weights['layer2.0.conv1.weight'][0, 0, 0, 0] = float('nan')
    path = _replace(run_dir, 'weights', save_safetensors(weights))
    entry = "'layer2.0.conv1.weight'"
    with pytest.raises(CheckpointError, match=rf'^{_at(path)}: entry {entry} holds NaN or inf values'):
        run(parse_args([*resume, str(run_dir)]))
    weights['layer2.0.conv1.weight'] = torch.zeros(3, 3)
    path = _replace(run_dir, 'weights', save_safetensors(weights))
    with pytest.raises(CheckpointError, match=rf'{_at(path)}: entry {entry} has shape \(3, 3\), the model'):
        run(parse_args([*resume, str(run_dir)]))
    del weights['layer2.0.conv1.weight']
    path = _replace(run_dir, 'weights', save_safetensors(weights))
    with pytest.raises(CheckpointError, match=rf"{_at(path)}: missing entry 'layer2.0.conv1.weight'"):
        run(parse_args([*resume, str(run_dir)]))

    run_dir = _copy(runs['cut'], tmp_path / 'c')
    state = torch.load(_current(run_dir, 'state'), weights_only=True)
    next(iter(state['optimizer']['state'].values()))['momentum_buffer'].fill_(float('inf'))
    path = _replace(run_dir, 'state', _torch_bytes(state))
    entry = "'optimizer.state.0.momentum_buffer'"
    with pytest.raises(CheckpointError, match=rf'{_at(path)}: entry {entry} holds NaN'):
        run(parse_args([*resume, str(run_dir)]))


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_is_refused_with_our_message_and_never_runs(runs, tmp_path):
    run_dir = _copy(runs['cut'], tmp_path / 'cut')
    marker = tmp_path / 'ran'
    path = _replace(run_dir, 'state', pickle.dumps({'epoch': _RunsCode(marker)}, protocol=2))
    with pytest.raises(CheckpointError, match=rf'^{_at(path)}: refused: it holds Python objects') as info:
        run(parse_args([*runs['args'], '--resume', str(run_dir)]))
    assert 'weights_only' not in str(info.value)
    torch.save({'epoch': _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match='refused'):
        visattn.engine.read_weights(path)
    assert not marker.exists()


def test_nan_loss_after_resume_names_the_checkpoint(runs, tmp_path, monkeypatch):
    run_dir = _copy(runs['cut'], tmp_path / 'cut')
    weights = _current(run_dir, 'weights').name

    def nan_epoch(*args, **kwargs):
        raise FloatingPointError('loss is nan at epoch 3, batch 1')

    monkeypatch.setattr('visattn.engine.runner.train_one_epoch', nan_epoch)
    with pytest.raises(FloatingPointError, match=rf'loss is nan at epoch 3, batch 1, after resuming from .*{weights}'):
        run(parse_args([*runs['args'], '--resume', str(run_dir)]))


def test_a_finished_or_unfinished_folder_is_not_overwritten_unless_asked(runs, tmp_path):
    out = ['--output', str(tmp_path)]
    _copy(runs['ref'], tmp_path / 'ref')
    _copy(runs['cut'], tmp_path / 'cut')
    with pytest.raises(RunFolderError, match='already holds a finished run'):
        run(parse_args([*runs['args'], *out, '--experiment', 'ref']))
    with pytest.raises(RunFolderError, match=r'an unfinished run \(epoch 2 of 3\): continue it with --resume'):
        run(parse_args([*runs['args'], *out, '--experiment', 'cut']))
    run(parse_args([*runs['args'], *out, '--experiment', 'cut', '--overwrite']))
    _assert_same_outputs(tmp_path / 'cut', runs['ref'])  # started over: the run of three epochs again


def test_a_second_run_into_a_live_folder_is_refused(folder, tmp_path):
    argv = [sys.executable, str(ROOT / 'train.py'), '--data-dir', str(folder), '--output', str(tmp_path),
            '--experiment', 'live', *TINY, '--epochs', '1000']
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))
    lock = tmp_path / 'live' / 'run.lock'
    try:
        deadline = time.monotonic() + 120
        while not (lock.exists() and f'"pid": {proc.pid}' in lock.read_text()) and time.monotonic() < deadline:
            assert proc.poll() is None, 'the first run ended early'
            time.sleep(0.1)
        with pytest.raises(RunFolderError, match=rf'live is in use by process {proc.pid} on host '):
            run(parse_args(['--data-dir', str(folder), '--output', str(tmp_path), '--experiment', 'live', *TINY,
                            '--overwrite']))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the killed run left its lock file: stale, taken over, and its owner reported
    held = RunLock(tmp_path / 'live')
    assert held.acquire()['pid'] == proc.pid
    held.release()
    assert not lock.exists()


def test_stale_lock_without_flock_is_judged_by_pid(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir_module, 'fcntl', None)
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    host = __import__('socket').gethostname()
    (tmp_path / 'run.lock').write_text(json.dumps({'pid': dead.pid, 'host': host, 'since': 0}))
    lock = RunLock(tmp_path)
    assert lock.acquire()['pid'] == dead.pid
    lock.release()
    (tmp_path / 'run.lock').write_text(json.dumps({'pid': os.getppid(), 'host': host, 'since': 0}))
    with pytest.raises(RunFolderError, match=f'in use by process {os.getppid()} on host {host}'):
        RunLock(tmp_path).acquire()
