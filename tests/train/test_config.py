"""Configs are checked before anything runs: one line on stderr and exit status 2 for every mistake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import visattn  # noqa: F401
from visattn.engine import ConfigError, cli, parse_args

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from _data import make_image_folder  # noqa: E402


@pytest.fixture(scope='module')
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('imgs'))


def _error(argv: list[str], capsys) -> str:
    """The one stderr line of ``train.py argv``, which must end with status 2."""
    capsys.readouterr()
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('train.py: error: '), err
    return err.removeprefix('train.py: error: ').strip()


YAML_CASES = {
    'epochs: 1.5': 'c.yaml: epochs must be a positive integer, got 1.5',
    'epochs: true': 'c.yaml: epochs must be a positive integer, got true',
    'batch_size: [64]': 'c.yaml: batch_size must be a positive integer, got [64]',
    'amp: bf17': "c.yaml: amp must be one of none, bf16, fp16, got 'bf17'; did you mean 'bf16'?",
    'task: detection': "c.yaml: task must be one of classification, segmentation, got 'detection'",
    'epochs: 3\n  lr: [0.1\n': 'c.yaml: invalid YAML at line 2, column 5: mapping values are not allowed here',
    'epoch: 3': "c.yaml: unknown option 'epoch'; did you mean 'epochs'?",
    'hflip: 1.5': 'c.yaml: hflip must be a number in [0, 1], got 1.5',
    'lr: -0.1': 'c.yaml: lr must be a positive number, got -0.1',
    'scale_range: [2.0, 0.5]': 'c.yaml: scale_range must be two positive numbers, low <= high, got [2.0, 0.5]',
    '- epochs': 'c.yaml: expected a mapping of option: value, got list',
}


@pytest.mark.parametrize('text', list(YAML_CASES), ids=list(range(len(YAML_CASES))))
def test_bad_yaml_is_one_line_naming_the_file_and_key(text, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path('c.yaml').write_text(text + '\n')
    assert _error(['-c', 'c.yaml'], capsys).startswith(YAML_CASES[text])


# the same schema for flags: the same words, naming the flag
FLAG_CASES = [
    (['--epochs', '1.5'], '--epochs must be a positive integer, got 1.5'),
    (['--epochs', '0'], '--epochs must be a positive integer, got 0'),
    (['--amp', 'bf17'], "--amp must be one of none, bf16, fp16, got 'bf17'; did you mean 'bf16'?"),
    (['--task', 'detection'], "--task must be one of classification, segmentation, got 'detection'"),
    (['--reprob', '2'], '--reprob must be a number in [0, 1], got 2'),
    (['--pretrained', 'maybe'], "--pretrained must be true or false, got 'maybe'"),
    (['--batchsize', '8'], 'unrecognized argument --batchsize; did you mean --batch-size?'),
    (['--epochs'], 'argument --epochs: expected one argument'),
    (['--model', 'resnet18_cbma'], "--model must be a timm or visattn model name, got 'resnet18_cbma'; did you mean "
                                   "'resnet18_cbam'?"),
    (['--sched', 'cosin'], "--sched must be one of cosine, "),
    (['--opt', 'adamx'], "--opt must be an optimizer of timm's create_optimizer_v2, got 'adamx'"),
    (['--dataset', 'folder'], "--data-dir is required for dataset 'folder'"),
    (['-c', 'missing.yaml'], 'missing.yaml: config file not found'),
    (['--resume', 'nowhere'], '--resume: no checkpoint at nowhere'),
    (['--resume-fallback'], '--resume-fallback needs --resume'),
    (['--device', 'gpu0'], "--device must be a torch device such as cpu, cuda or cuda:1, got 'gpu0'"),
]


@pytest.mark.parametrize('argv,message', FLAG_CASES, ids=[' '.join(a) for a, _ in FLAG_CASES])
def test_bad_flags_are_one_line_naming_the_flag(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _error(argv, capsys).startswith(message)


def test_device_must_be_available(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert _error(['--device', 'cuda'], capsys).startswith("--device 'cuda': no CUDA GPU is available here")


def test_segmentation_heads_come_from_the_heads_registry(tmp_path, capsys):
    from visattn.seg import list_heads

    msg = _error(['--task', 'segmentation', '--data-dir', str(tmp_path), '--head', 'fcnn'], capsys)
    assert msg.startswith(f'--head must be one of {", ".join(list_heads())} (or a 2-D attention block')
    assert msg.endswith("got 'fcnn'; did you mean 'fcn'?") and 'cbam' not in msg
    args = parse_args(['--task', 'segmentation', '--data-dir', str(tmp_path), '--head', 'cbam'])  # a plain AttnHead
    assert args.head == 'cbam'
    assert _error(['--task', 'segmentation', '--data-dir', str(tmp_path), '--dataset', 'folder'], capsys) == (
        "--dataset must be one of ade20k for segmentation, got 'folder'")


def test_batch_size_above_the_dataset_needs_drop_last_false(folder, tmp_path, capsys):
    common = ['--data-dir', str(folder), '--output', str(tmp_path), '--model', 'test_resnet', '--img-size', '16',
              '--epochs', '1', '--progress', 'false', '--plot', 'false']
    assert _error([*common, '--batch-size', '5000'], capsys) == (
        '--batch-size must be at most the 24 training samples per process (or pass --drop-last false for one '
        'partial batch per epoch), got 5000')
    assert not (tmp_path / 'test_resnet-folder').exists()  # refused before the run folder is made
    assert cli([*common, '--batch-size', '5000', '--drop-last', 'false']) == 0


def test_yaml_values_are_typed_as_flags_are(tmp_path):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('lr: 1e-3\nepochs: 4.0\nscale_range: [0.5, 1.5]\nnum_classes: null\ndrop-last: false\n')
    args = parse_args(['-c', str(cfg)])
    assert (args.lr, args.epochs, args.scale_range, args.num_classes, args.drop_last) == (
        0.001, 4, (0.5, 1.5), None, False)
    assert type(args.epochs) is int
    args = parse_args(['-c', str(cfg), '--lr', '2e-3', '--epochs', '6', '--scale-range', '0.75,1.25'])
    assert (args.lr, args.epochs, args.scale_range) == (0.002, 6, (0.75, 1.25))


def test_ade20k_splits_default_to_its_layout(tmp_path):
    args = parse_args(['--task', 'segmentation', '--data-dir', str(tmp_path)])
    assert (args.dataset, args.train_split, args.val_split) == ('ade20k', 'training', 'validation')
    args = parse_args(['--data-dir', str(tmp_path)])
    assert (args.dataset, args.train_split, args.val_split) == ('folder', 'train', 'val')
    args = parse_args(['--task', 'segmentation', '--data-dir', str(tmp_path), '--val-split', 'val'])
    assert (args.train_split, args.val_split) == ('training', 'val')


def test_debug_raises_with_the_traceback(tmp_path):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('epochs: 1.5\n')
    with pytest.raises(ConfigError, match='epochs must be a positive integer'):
        cli(['-c', str(cfg), '--debug'])


def test_train_py_exits_2_with_one_line_and_no_traceback(tmp_path):
    cfg = tmp_path / 'config.yaml'
    cfg.write_text('epochs: 1.5\n')
    res = subprocess.run([sys.executable, str(ROOT / 'train.py'), '-c', str(cfg)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2
    assert res.stderr == f'train.py: error: {cfg}: epochs must be a positive integer, got 1.5\n'
    assert res.stdout == ''
