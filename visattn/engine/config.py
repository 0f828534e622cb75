"""Command line and YAML configuration of ``train.py``: a YAML file sets the defaults, the command line
overrides them (timm's pattern), and the resolved configuration is saved beside the run's outputs."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

TASKS = ('classification', 'segmentation')
DATASETS = ('digits', 'folder', 'ade20k')
AMP = ('none', 'bf16', 'fp16')


def _bool(value: str) -> bool:
    if value.lower() in ('1', 'true', 'yes', 'on'):
        return True
    if value.lower() in ('0', 'false', 'no', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'expected true or false, got {value!r}')


def _floats(value: str) -> tuple[float, ...]:
    return tuple(float(v) for v in value.replace(',', ' ').split())


def build_parser() -> argparse.ArgumentParser:
    """The parser of every option; its defaults are the demo (UCI digits, ``resnet18_cbam``)."""
    p = argparse.ArgumentParser(
        description='Fine-tune visattn/timm backbones: classification (ImageNet layout, or the built-in digits '
                    'demo when run without arguments) and semantic segmentation (ADE20K layout).')
    p.add_argument('-c', '--config', default='', help='YAML file whose keys set the defaults of these options')
    g = p.add_argument_group('task and data')
    g.add_argument('--task', default='classification', choices=TASKS)
    g.add_argument('--data-dir', default='', help='dataset root (ImageNet or ADE20K layout)')
    g.add_argument('--dataset', default='', choices=('',) + DATASETS,
                   help="'digits' (built in), 'folder' (ImageNet layout) or 'ade20k'; default: digits without "
                        '--data-dir, else folder or ade20k by task')
    g.add_argument('--train-split', default='train')
    g.add_argument('--val-split', default='val')
    g.add_argument('--workers', type=int, default=0, help='data loader processes per rank')
    g = p.add_argument_group('model')
    g.add_argument('--model', default='resnet18_cbam', help='timm or visattn model name')
    g.add_argument('--pretrained', type=_bool, nargs='?', const=True, default=False,
                   help="start from timm's published weights (for a visattn model: those of its timm base)")
    g.add_argument('--init-from', default='', help='a plain timm checkpoint (.safetensors/.pth) to start from')
    g.add_argument('--num-classes', type=int, default=None, help='default: taken from the dataset')
    g.add_argument('--in-chans', type=int, default=None, help='default: 1 for digits, else 3')
    g.add_argument('--img-size', type=int, default=224)
    g.add_argument('--crop-pct', type=float, default=0.875)
    g.add_argument('--small-input-stem', type=_bool, nargs='?', const=True, default=None,
                   help='3x3 stride-1 stem without max-pool, for tiny images (ResNets); default: on for digits')
    g.add_argument('--drop-path', type=float, default=0.0)
    g.add_argument('--sync-bn', type=_bool, nargs='?', const=True, default=False,
                   help='synchronised batch norm across GPUs (distributed CUDA runs)')
    g.add_argument('--channels-last', type=_bool, nargs='?', const=True, default=False)
    g = p.add_argument_group('segmentation')
    g.add_argument('--head', default='fcn', help='decode head: fcn, cc, da, ema, external, nl')
    g.add_argument('--head-channels', type=int, default=512)
    g.add_argument('--attn-kwargs', type=yaml.safe_load, default=None, help='YAML dict for the head block')
    g.add_argument('--aux-weight', type=float, default=0.4, help='loss weight of the auxiliary FCN head (0: none)')
    g.add_argument('--output-stride', type=int, default=8)
    g.add_argument('--crop-size', type=int, default=512)
    g.add_argument('--scale-range', type=_floats, default=(0.5, 2.0))
    g.add_argument('--val-scale', type=int, default=512, help='short side of validation images (0: as is)')
    g.add_argument('--slide', type=_bool, nargs='?', const=True, default=False, help='sliding-window eval')
    g.add_argument('--iters', type=int, default=0, help='segmentation: total iterations (replaces --epochs)')
    g.add_argument('--eval-interval', type=int, default=1000, help='segmentation: iterations between evals')
    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=int, default=5)
    g.add_argument('--batch-size', type=int, default=64, help='per rank')
    g.add_argument('--grad-accum', type=int, default=1)
    g.add_argument('--opt', default='sgd')
    g.add_argument('--lr', type=float, default=0.1)
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--weight-decay', type=float, default=5e-4)
    g.add_argument('--clip-grad', type=float, default=None)
    g.add_argument('--sched', default='cosine')
    g.add_argument('--warmup-epochs', type=int, default=0)
    g.add_argument('--warmup-lr', type=float, default=1e-4)
    g.add_argument('--min-lr', type=float, default=0.0)
    g.add_argument('--decay-epochs', type=float, default=30)
    g.add_argument('--decay-rate', type=float, default=0.1, help='step decay factor; poly: the power')
    g.add_argument('--amp', default='none', choices=AMP)
    g.add_argument('--model-ema', type=_bool, nargs='?', const=True, default=False)
    g.add_argument('--model-ema-decay', type=float, default=0.9998)
    g = p.add_argument_group('augmentation and regularisation')
    g.add_argument('--aa', default=None, help="timm auto-augment, e.g. 'rand-m9-mstd0.5'")
    g.add_argument('--hflip', type=float, default=0.5)
    g.add_argument('--color-jitter', type=float, default=0.4)
    g.add_argument('--reprob', type=float, default=0.0)
    g.add_argument('--mixup', type=float, default=0.0)
    g.add_argument('--cutmix', type=float, default=0.0)
    g.add_argument('--smoothing', type=float, default=0.0)
    g.add_argument('--shift', type=int, default=0, help='digits: random translation in pixels')
    g = p.add_argument_group('run')
    g.add_argument('--seed', type=int, default=42)
    g.add_argument('--output', default='output', help='folder of the run folders')
    g.add_argument('--experiment', default='', help='run folder name (default: <model>-<dataset>)')
    g.add_argument('--resume', default='', help='a run folder or its state.pt: continue exactly where it stopped')
    g.add_argument('--stop-after-epoch', type=int, default=0,
                   help='end the run cleanly after this epoch (e.g. for a time-sliced job; --resume continues)')
    g.add_argument('--threads', type=int, default=None,
                   help="CPU threads of torch's ops (0: torch's default); default: 1 for the digits, whose tiny "
                        'images run fastest on one thread, else 0')
    g.add_argument('--device', default='', help="default: cuda:<local rank> if available, else cpu")
    g.add_argument('--progress', type=_bool, nargs='?', const=True, default=True, help='tqdm progress bar')
    g.add_argument('--plot', type=_bool, nargs='?', const=True, default=True, help='loss/accuracy PNG at the end')
    return p


def _dest(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if a.dest != 'help'}


def load_yaml(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The options of a YAML config, keys with ``-`` or ``_``; an unknown key is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'config file not found: {path}')
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f'{path}: expected a mapping of option: value, got {type(cfg).__name__}')
    cfg = {k.replace('-', '_'): v for k, v in cfg.items()}
    unknown = sorted(set(cfg) - _dest(parser))
    if unknown:
        raise ValueError(f'{path}: unknown option(s) {unknown}; see `python train.py --help`')
    for key in ('scale_range',):
        if key in cfg and isinstance(cfg[key], list):
            cfg[key] = tuple(cfg[key])
    return cfg


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``-c config.yaml`` first, take its values as defaults, then parse the rest of the command line."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('-c', '--config', default='')
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_yaml(known.config, parser))
    args = parser.parse_args(argv)
    if not args.dataset:
        args.dataset = 'digits' if not args.data_dir else ('ade20k' if args.task == 'segmentation' else 'folder')
    digits = args.dataset == 'digits'
    if args.in_chans is None:
        args.in_chans = 1 if digits else 3
    if args.small_input_stem is None:
        args.small_input_stem = digits
    if args.threads is None:
        args.threads = 1 if digits else 0
    if args.task == 'segmentation' and digits:
        raise ValueError("the digits demo is a classification task; segmentation needs --data-dir (ADE20K layout)")
    if not digits and not args.data_dir:
        raise ValueError(f'--data-dir is required for dataset {args.dataset!r}')
    for name in ('batch_size', 'grad_accum', 'epochs'):
        if getattr(args, name) < 1:
            raise ValueError(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    return args


def save_config(args: argparse.Namespace, path: str | Path) -> None:
    """Write the resolved options as YAML (loadable again with ``-c``)."""
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items() if k not in ('config',)}
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=True))
