"""Command line and YAML configuration of ``train.py``: a YAML file sets the defaults, the command line
overrides them (timm's pattern), and the resolved configuration is saved beside the run's outputs.

One schema (a `Rule` per option: type, range, choices) checks the values of both sources, before anything runs:
a mistake is a `ConfigError` of one line that names where the value came from
(``config.yaml: epochs must be a positive integer, got 1.5`` or ``--epochs must be ...``).
"""

from __future__ import annotations

import argparse
import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

TASKS = ('classification', 'segmentation')
DATASETS = ('digits', 'folder', 'ade20k')
TASK_DATASETS = {'classification': ('digits', 'folder'), 'segmentation': ('ade20k',)}
SPLITS = {'ade20k': ('training', 'validation')}  # (train, val) folder names; other datasets: ('train', 'val')
AMP = ('none', 'bf16', 'fp16')
SCHEDULERS = ('cosine', 'tanh', 'step', 'multistep', 'plateau', 'poly', 'constant', 'wsd', 'rsqrt')
RUN_CONTROL = ('config', 'list_configs', 'resume', 'resume_fallback', 'overwrite', 'debug')  # not saved in config.yaml
_BOOLS = {'1': True, 'true': True, 'yes': True, 'on': True, '0': False, 'false': False, 'no': False, 'off': False}


class ConfigError(ValueError):
    """A mistake in the options of a run, in one line that names the option and where its value came from."""


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool) or value is None:
        return {True: 'true', False: 'false', None: 'null'}[value]
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10 ** 6).strip().removesuffix('...').strip()


def _scalar(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _close(name: str, names: Sequence[str], fmt: str = '{!r}') -> str:
    match = difflib.get_close_matches(name, list(names), n=1)
    return f'; did you mean {fmt.format(match[0])}?' if match else ''


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Rule:
    """The type and the valid values of one option, for YAML values and command-line strings alike.

    ``kind`` is ``'int'``, ``'float'``, ``'bool'``, ``'str'``, ``'range'`` (two positive numbers, low <= high)
    or ``'mapping'``; ``lo``/``hi`` bound numbers (``open_lo``: strictly above ``lo``); ``choices`` are the valid
    strings, or a function that returns them; ``what`` replaces the generated description.
    """

    kind: str
    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None
    nullable: bool = False
    what: str = ''

    def names(self) -> Sequence[str]:
        return self.choices() if callable(self.choices) else (self.choices or ())

    def describe(self) -> str:
        if self.what:
            text = self.what
        elif self.kind in ('int', 'float'):
            noun = 'integer' if self.kind == 'int' else 'number'
            if self.lo is not None and self.hi is not None:
                text = f'a{"n" if noun == "integer" else ""} {noun} in [{self.lo:g}, {self.hi:g}]'
            elif self.lo == 0:
                text = f'a positive {noun}' if self.open_lo else f'a non-negative {noun}'
            elif self.lo == 1 and self.kind == 'int':
                text = 'a positive integer'
            else:
                text = f'a{"n" if noun == "integer" else ""} {noun}' + (f' >= {self.lo:g}' if self.lo else '')
        elif self.kind == 'bool':
            text = 'true or false'
        elif self.kind == 'str':
            text = f'one of {", ".join(self.names())}' if self.choices else 'a string'
        elif self.kind == 'range':
            text = 'two positive numbers, low <= high'
        else:
            text = 'a mapping'
        return text + (' or null' if self.nullable else '')

    def check(self, value: Any, subject: str) -> Any:
        """``value`` (a YAML value, or a command-line string) in its canonical type.

        Raises:
            ConfigError: ``'<subject> must be <describe()>, got <value>'``.
        """
        if value is None and self.nullable:
            return None
        ok, value = self._convert(value)
        hint = ''
        if ok and self.kind in ('int', 'float'):
            ok = (self.lo is None or value > self.lo or (value == self.lo and not self.open_lo)) and (
                self.hi is None or value <= self.hi)
        elif ok and self.kind == 'str' and self.choices and value not in self.names():
            ok, hint = False, _close(value, self.names())
        if not ok:
            raise ConfigError(f'{subject} must be {self.describe()}, got {_show(value)}{hint}')
        return value

    def _convert(self, value: Any) -> tuple[bool, Any]:
        kind = self.kind
        if kind in ('int', 'float'):
            value = _scalar(value) if isinstance(value, str) else value
            if not _number(value) or (kind == 'int' and value != int(value)):
                return False, value
            return True, int(value) if kind == 'int' else float(value)
        if kind == 'bool':
            value = _BOOLS.get(value.lower(), value) if isinstance(value, str) else value
            return isinstance(value, bool), value
        if kind == 'str':
            return isinstance(value, str), value
        if kind == 'range':
            if isinstance(value, str):
                value = [_scalar(v) for v in value.replace(',', ' ').split()]
            ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(_number(v) and v > 0 for v in value)
            return ok and value[0] <= value[1], tuple(float(v) for v in value) if ok else value
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                return False, value
        return isinstance(value, dict) or (value is None and self.nullable), value


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are `ConfigError` (one line) instead of usage + ``SystemExit(2)``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def _optimizers() -> list[str]:
    from timm.optim import list_optimizers

    names = list_optimizers()
    return names + [f'lookahead_{n}' for n in names]


def _heads() -> list[str]:
    from .. import registry
    from ..seg import list_heads

    return list_heads() + [n for n in registry.list_attn() if n not in list_heads()]


def _head_names() -> str:
    from ..seg import list_heads

    return f'one of {", ".join(list_heads())} (or a 2-D attention block: `visattn list --kind attn`)'


def build_parser() -> argparse.ArgumentParser:
    """The parser of every option; its defaults are the demo (UCI digits, ``resnet18_cbam``).

    ``parser.rules`` maps each option's ``dest`` to its `Rule`; the parser itself converts nothing, so that a YAML
    value and a command-line string go through the same checks (`parse_args`).
    """
    p = _Parser(
        prog='train.py',
        description='Fine-tune visattn/timm backbones: classification (ImageNet layout, or the built-in digits '
                    'demo when run without arguments) and semantic segmentation (ADE20K layout).')
    rules: dict[str, Rule] = {}

    def add(group: Any, flag: str, rule: Rule, default: Any, help: str | None = None) -> None:
        dest = flag.removeprefix('--').replace('-', '_')
        rules[dest] = rule
        kw: dict[str, Any] = dict(default=default, help=help)
        if rule.kind == 'bool':
            kw.update(nargs='?', const=True, metavar='BOOL')
        elif rule.kind == 'str' and rule.choices and not callable(rule.choices):
            kw.update(metavar='{' + ','.join(rule.choices) + '}')
        group.add_argument(flag, **kw)

    p.add_argument('-c', '--config', default='', help='YAML file whose keys set the defaults of these options, or '
                   'the name of a shipped recipe (imagenet/resnet50_cbam; --list-configs lists them)')
    p.add_argument('--list-configs', action='store_true', help='print the names of the shipped recipes and exit')
    g = p.add_argument_group('task and data')
    add(g, '--task', Rule('str', choices=TASKS), 'classification')
    add(g, '--data-dir', Rule('str'), '', 'dataset root (ImageNet or ADE20K layout)')
    add(g, '--dataset', Rule('str', choices=('',) + DATASETS, what=f'one of {", ".join(DATASETS)}'), '',
        "'digits' (built in), 'folder' (ImageNet layout) or 'ade20k'; default: digits without --data-dir, else "
        'folder or ade20k by task')
    add(g, '--train-split', Rule('str', nullable=True), None, 'default: train (ADE20K: training)')
    add(g, '--val-split', Rule('str', nullable=True), None, 'default: val (ADE20K: validation)')
    add(g, '--workers', Rule('int', lo=0), 0, 'data loader processes per rank')
    add(g, '--drop-last', Rule('bool', nullable=True), None,
        'drop the last partial batch of each epoch; default: only with mixup/cutmix. false also allows a batch size '
        'above the number of training samples (one partial batch per epoch)')
    g = p.add_argument_group('model')
    add(g, '--model', Rule('str'), 'resnet18_cbam', 'timm or visattn model name')
    add(g, '--pretrained', Rule('bool'), False,
        "start from timm's published weights (for a visattn model: those of its timm base)")
    add(g, '--init-from', Rule('str'), '', 'a plain timm checkpoint (.safetensors/.pth) to start from')
    add(g, '--num-classes', Rule('int', lo=1, nullable=True), None, 'default: taken from the dataset')
    add(g, '--in-chans', Rule('int', lo=1, nullable=True), None, 'default: 1 for digits, else 3')
    add(g, '--img-size', Rule('int', lo=1), 224)
    add(g, '--crop-pct', Rule('float', lo=0, hi=1, open_lo=True, what='a number in (0, 1]'), 0.875)
    add(g, '--small-input-stem', Rule('bool', nullable=True), None,
        '3x3 stride-1 stem without max-pool, for tiny images (ResNets); default: on for digits')
    add(g, '--drop-path', Rule('float', lo=0, hi=1), 0.0)
    add(g, '--sync-bn', Rule('bool'), False, 'synchronised batch norm across GPUs (distributed CUDA runs)')
    add(g, '--channels-last', Rule('bool'), False)
    g = p.add_argument_group('segmentation')
    add(g, '--head', Rule('str', choices=_heads, what=_head_names()), 'fcn', 'decode head: fcn, cc, da, ema, '
        'external, nl, or any 2-D attention block')
    add(g, '--head-channels', Rule('int', lo=1), 512)
    add(g, '--attn-kwargs', Rule('mapping', nullable=True), None, 'YAML dict for the head block')
    add(g, '--aux-weight', Rule('float', lo=0), 0.4, 'loss weight of the auxiliary FCN head (0: none)')
    add(g, '--output-stride', Rule('int', lo=1), 8)
    add(g, '--crop-size', Rule('int', lo=1), 512)
    add(g, '--scale-range', Rule('range'), (0.5, 2.0))
    add(g, '--val-scale', Rule('int', lo=0), 512, 'short side of validation images (0: as is)')
    add(g, '--slide', Rule('bool'), False, 'sliding-window eval')
    add(g, '--iters', Rule('int', lo=0), 0, 'segmentation: total iterations (replaces --epochs)')
    add(g, '--eval-interval', Rule('int', lo=1), 1000, 'segmentation: iterations between evals')
    g = p.add_argument_group('optimisation')
    add(g, '--epochs', Rule('int', lo=1), 5)
    add(g, '--batch-size', Rule('int', lo=1), 64, 'per rank')
    add(g, '--grad-accum', Rule('int', lo=1), 1)
    add(g, '--opt', Rule('str', choices=_optimizers, what="an optimizer of timm's create_optimizer_v2"), 'sgd')
    add(g, '--lr', Rule('float', lo=0, open_lo=True), 0.1)
    add(g, '--momentum', Rule('float', lo=0, hi=1), 0.9)
    add(g, '--weight-decay', Rule('float', lo=0), 5e-4)
    add(g, '--clip-grad', Rule('float', lo=0, open_lo=True, nullable=True), None)
    add(g, '--sched', Rule('str', choices=SCHEDULERS), 'cosine')
    add(g, '--warmup-epochs', Rule('int', lo=0), 0)
    add(g, '--warmup-lr', Rule('float', lo=0), 1e-4)
    add(g, '--min-lr', Rule('float', lo=0), 0.0)
    add(g, '--decay-epochs', Rule('float', lo=0, open_lo=True), 30)
    add(g, '--decay-rate', Rule('float', lo=0, open_lo=True), 0.1, 'step decay factor; poly: the power')
    add(g, '--amp', Rule('str', choices=AMP), 'none')
    add(g, '--model-ema', Rule('bool'), False)
    add(g, '--model-ema-decay', Rule('float', lo=0, hi=1), 0.9998)
    g = p.add_argument_group('augmentation and regularisation')
    add(g, '--aa', Rule('str', nullable=True), None, "timm auto-augment, e.g. 'rand-m9-mstd0.5'")
    add(g, '--hflip', Rule('float', lo=0, hi=1), 0.5, 'probability of a horizontal flip')
    add(g, '--color-jitter', Rule('float', lo=0), 0.4)
    add(g, '--reprob', Rule('float', lo=0, hi=1), 0.0, 'probability of random erasing')
    add(g, '--mixup', Rule('float', lo=0), 0.0, 'mixup alpha')
    add(g, '--cutmix', Rule('float', lo=0), 0.0, 'cutmix alpha')
    add(g, '--smoothing', Rule('float', lo=0, hi=1), 0.0)
    add(g, '--shift', Rule('int', lo=0), 0, 'digits: random translation in pixels')
    g = p.add_argument_group('run')
    add(g, '--seed', Rule('int', lo=0), 42)
    add(g, '--output', Rule('str'), 'output', 'folder of the run folders')
    add(g, '--experiment', Rule('str'), '', 'run folder name (default: <model>-<dataset>)')
    add(g, '--resume', Rule('str'), '', 'a run folder (or its checkpoint.json): continue it exactly where it stopped')
    add(g, '--resume-fallback', Rule('bool'), False,
        'with --resume: if the last checkpoint is damaged, resume from the previous one')
    add(g, '--overwrite', Rule('bool'), False, 'start over in a run folder that holds another run')
    add(g, '--stop-after-epoch', Rule('int', lo=0), 0,
        'end the run cleanly after this epoch (e.g. for a time-sliced job; --resume continues)')
    add(g, '--threads', Rule('int', lo=0, nullable=True), None,
        "CPU threads of torch's ops (0: torch's default); default: 1 for the digits, whose tiny images run fastest "
        'on one thread, else 0')
    add(g, '--device', Rule('str'), '', 'default: cuda:<local rank> if available, else cpu')
    add(g, '--progress', Rule('bool'), True, 'tqdm progress bar')
    add(g, '--plot', Rule('bool'), True, 'loss/accuracy PNG at the end')
    add(g, '--debug', Rule('bool'), False, 'show the traceback of an error')
    p.rules = rules  # type: ignore[attr-defined]
    return p


def load_yaml(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The options of a YAML config (keys with ``-`` or ``_``), each checked by the parser's rules.

    Raises:
        ConfigError: a missing or unreadable file, invalid YAML, an unknown key (with the closest option) or a
        value its rule refuses.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f'{path}: config file not found') from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f'{path}: cannot read the config ({e})') from None
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
        problem = getattr(e, 'problem', None) or str(e).strip().splitlines()[0]
        raise ConfigError(f'{path}: invalid YAML{where}: {problem}') from None
    cfg = {} if cfg is None else cfg
    if not isinstance(cfg, dict):
        raise ConfigError(f'{path}: expected a mapping of option: value, got {type(cfg).__name__}')
    rules: dict[str, Rule] = parser.rules  # type: ignore[attr-defined]
    out = {}
    for key, value in cfg.items():
        dest = str(key).replace('-', '_')
        if dest not in rules:
            raise ConfigError(f'{path}: unknown option {key!r}{_close(dest, list(rules))} '
                              '(python train.py --help lists the options)')
        out[dest] = rules[dest].check(value, f'{path}: {dest}')
    return out


def recipes_dir() -> Path:
    """The folder of the recipes shipped inside the package (``visattn/configs``; ``configs/`` of a checkout)."""
    return Path(__file__).resolve().parents[1] / 'configs'


def list_configs() -> list[str]:
    """The shipped recipes, as ``-c`` takes them: ``demo``, ``imagenet/resnet50_cbam``, ``ade20k/ccnet_resnet50``."""
    root = recipes_dir()
    return sorted(p.relative_to(root).with_suffix('').as_posix() for p in root.rglob('*.yaml'))


def resolve_config(value: str | Path) -> Path:
    """The YAML file that ``-c value`` means: an existing path, else a shipped recipe by name (``imagenet/
    resnet50_cbam``, with or without ``.yaml`` and a leading ``configs/``).

    Raises:
        ConfigError: neither a file nor a recipe; the message names the closest recipes.
    """
    path = Path(value)
    if path.exists():
        return path
    name = path.as_posix().removesuffix('.yaml')
    name = name[len('configs/'):] if name.startswith('configs/') else name
    shipped = recipes_dir() / f'{name}.yaml'
    if shipped.is_file():
        return shipped
    known = list_configs()
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ''
    raise ConfigError(f'{value}: config file not found, and no shipped recipe has that name{hint} '
                      '(--list-configs lists the recipes)')


def _given(argv: Sequence[str]) -> dict[str, str]:
    """``dest -> flag`` of the options that ``argv`` sets."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given, _ = parser.parse_known_args(argv)
    flags = {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings}
    return {dest: flags[dest] for dest in vars(given)}


def subject(args: argparse.Namespace, dest: str) -> str:
    """Where the value of ``dest`` came from, as errors name it: ``config.yaml: batch_size`` or ``--batch-size``."""
    return getattr(args, '_sources', {}).get(dest, '--' + dest.replace('_', '-'))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``-c config.yaml`` first, take its values as defaults, then parse the rest of the command line;
    check every value and the options together (the device, the task's dataset and head, ...).

    Raises:
        ConfigError: the first mistake, in one line.
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    pre = _Parser(add_help=False)
    pre.add_argument('-c', '--config', default='')
    known, _ = pre.parse_known_args(argv)
    sources: dict[str, str] = {}
    if known.config:
        cfg = load_yaml(resolve_config(known.config), parser)
        parser.set_defaults(**cfg)
        sources.update({dest: f'{known.config}: {dest}' for dest in cfg})
    args, extra = parser.parse_known_args(argv)
    if extra:
        flags = [s for a in parser._actions for s in a.option_strings if s.startswith('--')]
        raise ConfigError(f'unrecognized argument {extra[0]}{_close(extra[0].split("=")[0], flags, "{}")}')
    sources.update(_given(argv))
    for dest, rule in parser.rules.items():  # type: ignore[attr-defined]
        setattr(args, dest, rule.check(getattr(args, dest), sources.get(dest, dest)))
    args._sources = sources
    _resolve(args)
    return args


def _resolve(args: argparse.Namespace) -> None:
    """Defaults that depend on other options, and the checks of options together."""
    if not args.dataset:
        args.dataset = 'digits' if not args.data_dir else ('ade20k' if args.task == 'segmentation' else 'folder')
    digits = args.dataset == 'digits'
    if args.task == 'segmentation' and digits:
        raise ConfigError('the digits demo is a classification task; segmentation needs --data-dir (ADE20K layout)')
    if args.dataset not in TASK_DATASETS[args.task]:
        raise ConfigError(f'{subject(args, "dataset")} must be one of {", ".join(TASK_DATASETS[args.task])} for '
                          f'{args.task}, got {args.dataset!r}')
    if not digits and not args.data_dir:
        raise ConfigError(f'--data-dir is required for dataset {args.dataset!r}')
    train_split, val_split = SPLITS.get(args.dataset, ('train', 'val'))
    args.train_split = args.train_split or train_split
    args.val_split = args.val_split or val_split
    _check_model(args.model, subject(args, 'model'))
    if args.in_chans is None:
        args.in_chans = 1 if digits else 3
    if args.small_input_stem is None:
        args.small_input_stem = digits
    if args.threads is None:
        args.threads = 1 if digits else 0
    if args.resume and args.overwrite:
        raise ConfigError('--resume continues the run in a folder, --overwrite starts it over: choose one')
    if args.resume_fallback and not args.resume:
        raise ConfigError('--resume-fallback needs --resume')
    if args.resume and not Path(args.resume).exists():
        raise ConfigError(f'--resume: no checkpoint at {args.resume}')
    _check_device(args.device, subject(args, 'device'))


def _check_model(name: str, where: str) -> None:
    import timm

    if name.startswith(('hf-hub:', 'hf_hub:', 'local-dir:')) or timm.is_model(name.partition('.')[0]):
        return
    raise ConfigError(f'{where} must be a timm or visattn model name, got {name!r}{_close(name, timm.list_models())}')


def _check_device(device: str, where: str) -> None:
    if not device:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f'{where} must be a torch device such as cpu, cuda or cuda:1, got {device!r}') from None
    if dev.type == 'cuda':
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f'{where} {device!r}: no CUDA GPU is available here (torch.cuda.is_available() is '
                              'False); use --device cpu, or leave --device unset to take a GPU when there is one')
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f'{where} {device!r}: this machine has {count} CUDA device(s), cuda:0 to '
                              f'cuda:{count - 1}')
    elif dev.type != 'cpu':
        try:
            torch.empty(0, device=dev)
        except Exception as e:
            raise ConfigError(f'{where} {device!r} is not available here ({type(e).__name__})') from None


def save_config(args: argparse.Namespace, path: str | Path) -> None:
    """Write the resolved options as YAML (loadable again with ``-c``), written atomically; the options that
    control this one run (``--resume``, ``--overwrite``, ...) are left out."""
    from .checkpoint import atomic_write

    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()
           if k not in RUN_CONTROL and not k.startswith('_')}
    atomic_write(path, yaml.safe_dump(cfg, sort_keys=True).encode())
