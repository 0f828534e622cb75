"""train.py end to end on tiny generated data: loss goes down, outputs, exact resume, errors, configs."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

import visattn  # noqa: F401
from visattn.engine import CheckpointError, ConfigError, build_parser, load_yaml, parse_args, run

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from _data import make_image_folder  # noqa: E402

TINY = ['--model', 'resnet18_se', '--img-size', '16', '--batch-size', '8', '--lr', '0.05', '--warmup-epochs', '0',
        '--progress', 'false', '--plot', 'false', '--color-jitter', '0', '--hflip', '0', '--smoothing', '0']


def _train_main():
    spec = importlib.util.spec_from_file_location('train_script', ROOT / 'train.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _summary(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / 'summary.csv', newline='') as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('imgs'))


@pytest.fixture(scope='module')
def full_run(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp('out')
    torch.manual_seed(0)
    args = ['--data-dir', str(folder), '--epochs', '3', '--output', str(out), '--experiment', 'full', *TINY]
    metrics = _train_main()([*args, '--plot', 'true'])
    return out / 'full', metrics


def test_short_run_lowers_loss_and_writes_outputs(full_run):
    run_dir, metrics = full_run
    rows = _summary(run_dir)
    assert [int(r['epoch']) for r in rows] == [0, 1, 2]
    assert set(rows[0]) == {'epoch', 'train_loss', 'lr', 'eval_loss', 'eval_top1', 'eval_top5'}
    assert float(rows[-1]['train_loss']) < float(rows[0]['train_loss'])
    for name in ('last.safetensors', 'best.safetensors', 'checkpoint.json', 'config.yaml', 'summary.png'):
        assert (run_dir / name).is_file(), name
    umask = os.umask(0)
    os.umask(umask)
    for path in run_dir.iterdir():  # the user's umask, not mkstemp's 0600
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name
    assert not (run_dir / 'run.lock').exists()  # released at the end
    assert metrics['eval_top1'] == pytest.approx(float(rows[-1]['eval_top1']))
    # the saved config is loadable again with -c and names the run's options
    cfg = load_yaml(run_dir / 'config.yaml', build_parser())
    assert cfg['model'] == 'resnet18_se' and cfg['epochs'] == 3 and cfg['num_classes'] == 3
    # the weights load into a freshly built model
    model = timm.create_model('resnet18_se', num_classes=3)
    model.load_state_dict(load_file(run_dir / 'best.safetensors'))


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(folder, tmp_path):
    # a loader worker and random crops: the augmentation draws too must repeat after the resume
    common = ['--data-dir', str(folder), '--epochs', '3', '--output', str(tmp_path), *TINY, '--workers', '1']
    run(parse_args([*common, '--experiment', 'full']))
    cut = [*common, '--experiment', 'cut']
    run(parse_args([*cut, '--stop-after-epoch', '1']))
    assert len(_summary(tmp_path / 'cut')) == 1
    torch.manual_seed(123)  # the resumed run must not depend on the state of the process that resumes it
    run(parse_args([*cut, '--resume', str(tmp_path / 'cut')]))
    full, resumed = load_file(tmp_path / 'full' / 'last.safetensors'), load_file(tmp_path / 'cut' / 'last.safetensors')
    assert full.keys() == resumed.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0, msg=k)
    assert _summary(tmp_path / 'cut') == _summary(tmp_path / 'full')


def test_resume_rejects_corrupt_and_mismatched_checkpoints(full_run, folder, tmp_path):
    run_dir, _ = full_run
    common = ['--data-dir', str(folder), '--epochs', '3', '--output', str(tmp_path), *TINY]
    config = (run_dir / 'config.yaml').read_bytes()
    with pytest.raises(CheckpointError, match=r"another run \(model: checkpoint 'resnet18_se', this run 'resnet18_eca"):
        run(parse_args([*common, '--model', 'resnet18_eca', '--resume', str(run_dir)]))
    assert (run_dir / 'config.yaml').read_bytes() == config  # a refused resume writes nothing
    bad = tmp_path / 'bad'
    bad.mkdir()
    (bad / 'checkpoint.json').write_bytes(b'not a checkpoint')
    with pytest.raises(CheckpointError, match='checkpoint.json: corrupt manifest'):
        run(parse_args([*common, '--resume', str(bad)]))
    (bad / 'checkpoint.json').unlink()
    (bad / 'state.pt').write_bytes(b'a checkpoint of an older visattn')
    with pytest.raises(CheckpointError, match='older visattn'):
        run(parse_args([*common, '--resume', str(bad)]))
    with pytest.raises(ConfigError, match='no checkpoint'):
        run(parse_args([*common, '--resume', str(tmp_path / 'nowhere')]))


def test_bad_paths_and_missing_classes(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match='not a directory'):
        run(parse_args(['--data-dir', str(tmp_path / 'missing'), *TINY]))
    with pytest.raises(FileNotFoundError, match='split folder'):
        run(parse_args(['--data-dir', str(folder), '--val-split', 'test', *TINY]))
    broken = make_image_folder(tmp_path / 'broken', n_train=2, n_val=1)
    for f in (broken / 'val' / 'class2').iterdir():
        f.unlink()
    (broken / 'val' / 'class2').rmdir()
    with pytest.raises(ValueError, match=r"missing \['class2'\]"):
        run(parse_args(['--data-dir', str(broken), '--output', str(tmp_path), *TINY]))
    with pytest.raises(ValueError, match='data-dir is required'):
        parse_args(['--dataset', 'folder'])


def test_config_sets_defaults_and_command_line_overrides(tmp_path):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text(yaml.safe_dump({'model': 'resnet50_cbam', 'lr': 0.2, 'epochs': 7}))
    args = parse_args(['-c', str(cfg), '--lr', '0.3'])
    assert (args.model, args.lr, args.epochs) == ('resnet50_cbam', 0.3, 7)
    cfg.write_text(yaml.safe_dump({'learning_rate': 0.2}))
    with pytest.raises(ValueError, match='learning_rate'):
        parse_args(['-c', str(cfg)])
    with pytest.raises(ConfigError, match='config file not found'):
        parse_args(['-c', str(tmp_path / 'none.yaml')])


def test_no_arguments_is_the_digits_demo():
    args = parse_args([])
    assert (args.dataset, args.task, args.in_chans, args.small_input_stem) == ('digits', 'classification', 1, True)
    demo = load_yaml(ROOT / 'configs' / 'demo.yaml', build_parser())
    assert {k: getattr(args, k) for k in demo} == demo


@pytest.mark.parametrize('path', sorted((ROOT / 'configs').rglob('*.yaml')), ids=lambda p: p.stem)
def test_every_config_parses_and_names_a_known_model(path):
    cfg = load_yaml(path, build_parser())
    assert timm.is_model(cfg.get('model', 'resnet18_cbam')), cfg.get('model')
    if cfg.get('task') == 'segmentation':
        from visattn.seg import list_heads

        assert cfg.get('head', 'fcn') in list_heads()


def test_torchrun_two_processes_on_cpu(folder, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           str(ROOT / 'train.py'), '--data-dir', str(folder), '--epochs', '2', '--output', str(tmp_path),
           '--experiment', 'ddp', *TINY, '--amp', 'bf16', '--grad-accum', '2']
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _summary(tmp_path / 'ddp')
    assert len(rows) == 2
    # 12 validation images split over 2 ranks and summed: top-1 is a multiple of 100/12
    n_correct = float(rows[-1]['eval_top1']) * 12 / 100
    assert n_correct == pytest.approx(round(n_correct), abs=1e-6)
    assert res.stdout.count('epoch 2/2') == 1  # rank 0 alone logs
    assert (tmp_path / 'ddp' / 'last.safetensors').is_file()


@pytest.mark.slow
def test_demo_reaches_95_percent(tmp_path):
    metrics = _train_main()(['--output', str(tmp_path)])
    assert metrics['eval_top1'] >= 95


def test_training_options_run_together(folder, tmp_path):
    # bf16 autocast is exercised by the torchrun test: in a process whose thread count changed after start-up
    # (as pytest's), torch's CPU bf16 kernels are not deterministic here
    args = ['--data-dir', str(folder), '--epochs', '2', '--output', str(tmp_path), '--experiment', 'opts', *TINY,
            '--grad-accum', '2', '--clip-grad', '1.0', '--model-ema', '--model-ema-decay', '0.5',
            '--mixup', '0.2', '--cutmix', '1.0', '--smoothing', '0.1', '--channels-last', '--sched', 'step',
            '--decay-epochs', '1', '--opt', 'adamw', '--lr', '1e-3']
    metrics = run(parse_args(args))
    rows = _summary(tmp_path / 'opts')
    assert {'ema_eval_top1', 'ema_eval_loss'} <= set(rows[0])
    # the lr logged is the one of the next update: step decay by 0.1 after each epoch of 2 updates
    assert [float(r['lr']) for r in rows] == pytest.approx([1e-4, 1e-5])
    assert all(v == v for v in metrics.values())  # no NaN
