"""The run: set-up, the epoch loop, evaluation, checkpoints, ``summary.csv`` and the plot."""

from __future__ import annotations

import csv
import io
import math
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..data import EpochSampler, ShardSampler
from . import checkpoint as ckpt
from . import rundir
from .config import ConfigError, list_configs, parse_args, save_config, subject
from .distributed import DistInfo, barrier, cleanup, init_distributed
from .loop import Task, train_one_epoch
from .plot import plot_summary

RESUME_KEYS = ('task', 'model', 'dataset', 'num_classes', 'in_chans', 'small_input_stem', 'head', 'epochs',
               'batch_size', 'grad_accum', 'opt', 'sched', 'seed', 'iters', 'eval_interval', 'model_ema')
# the errors that are the user's to fix: one line and exit status 2 (OSError: a missing or unreadable data path)
USER_ERRORS = (ConfigError, ckpt.CheckpointError, rundir.RunFolderError, FloatingPointError, ValueError, OSError)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_task(args: Any, dist_info: DistInfo, log: Any) -> Task:
    if args.task == 'segmentation':
        from .segmentation import build_task as build
    else:
        from .classification import build_task as build
    return build(args, dist_info, log)


def run_dir_of(args: Any) -> Path:
    """The run folder: the one ``--resume`` names, else ``<output>/<experiment>``."""
    if args.resume:
        return ckpt.resolve_resume(args.resume)
    name = args.experiment or f'{args.model}-{args.head + "-" if args.task == "segmentation" else ""}{args.dataset}'
    return Path(args.output) / name


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one epoch on one rank: each epoch's randomness (augmentation, mixup, dropout, loader
    workers) depends only on (seed, epoch, rank), so a resumed run repeats an uninterrupted one exactly."""
    return (seed * 1_000_003 + epoch * 1_009 + rank) % 2 ** 32


def _loaders(task: Task, args: Any, dist_info: DistInfo) -> tuple[DataLoader, DataLoader, EpochSampler]:
    sampler = EpochSampler(len(task.train_set), num_samples=task.samples_per_epoch, rank=dist_info.rank,
                           world_size=dist_info.world_size, seed=args.seed)
    drop_last = task.extra.get('drop_last', False) if args.drop_last is None else args.drop_last
    if args.batch_size > len(sampler) and args.drop_last is not False:
        raise ConfigError(f'{subject(args, "batch_size")} must be at most the {len(sampler)} training samples per '
                          f'process (or pass --drop-last false for one partial batch per epoch), got {args.batch_size}')
    gen = torch.Generator().manual_seed(args.seed)
    train = DataLoader(task.train_set, args.batch_size, sampler=sampler, num_workers=args.workers,
                       drop_last=drop_last, generator=gen, pin_memory=dist_info.device.type == 'cuda',
                       persistent_workers=False)
    val = DataLoader(task.val_set, task.val_batch_size or args.batch_size, num_workers=args.workers,
                     sampler=ShardSampler(len(task.val_set), rank=dist_info.rank, world_size=dist_info.world_size))
    return train, val, sampler


def run(args: Any) -> dict[str, float]:
    """Train and evaluate as ``args`` says; returns the metrics of the last epoch (and ``best``)."""
    dist_info = init_distributed(args.device)
    try:
        return _run(args, dist_info)
    finally:
        cleanup()


def cli(argv: Sequence[str] | None = None, prog: str = 'train.py') -> int:
    """``train.py`` as a command: returns the exit status. A mistake of the user (options, data, a checkpoint, a
    busy run folder) is one line on stderr and status 2; ``--debug`` raises it with its traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = any(a in ('--debug', '--debug=true') for a in argv)  # before the options parse (or fail to)
    if '--list-configs' in argv:
        print('\n'.join(list_configs()))
        return 0
    try:
        args = parse_args(argv)
        debug = args.debug
        run(args)
    except USER_ERRORS as e:
        if debug:
            raise
        message = ' '.join(str(e).split()) or type(e).__name__
        print(f'{prog}: error: {message}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f'{prog}: interrupted; the last complete checkpoint is intact (--resume continues)', file=sys.stderr)
        return 130
    return 0


def _run(args: Any, dist_info: DistInfo) -> dict[str, float]:
    log = print if dist_info.is_main else (lambda *a, **k: None)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    task = build_task(args, dist_info, log)
    args.num_classes = task.num_classes
    model = task.model.to(dist_info.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_loader, val_loader, sampler = _loaders(task, args, dist_info)
    run_dir = run_dir_of(args)
    lock = rundir.prepare(run_dir, resume=bool(args.resume), overwrite=args.overwrite, log=log) \
        if dist_info.is_main else None
    try:
        barrier()
        log(f'{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters; '
            f'{len(task.train_set)} training / {len(task.val_set)} validation samples; '
            f'{dist_info.world_size} process(es) on {dist_info.device}; outputs in {run_dir}')
        return _fit(args, dist_info, task, model, train_loader, val_loader, sampler, run_dir, log)
    finally:
        if lock is not None:
            lock.release()


def _fit(args: Any, dist_info: DistInfo, task: Task, model: nn.Module, train_loader: DataLoader,
         val_loader: DataLoader, sampler: EpochSampler, run_dir: Path, log: Any) -> dict[str, float]:
    updates_per_epoch = math.ceil(len(train_loader) / args.grad_accum)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        decay_rate=args.decay_rate, min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
        step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    scaler = torch.amp.GradScaler(dist_info.device.type) if args.amp == 'fp16' else None
    config = {k: getattr(args, k) for k in RESUME_KEYS}

    start_epoch, best, history, manifest = 0, {'metric': -math.inf, 'epoch': -1}, [], None
    if args.resume:
        state, manifest = ckpt.load_checkpoint(run_dir, model, config, ema=ema, fallback=args.resume_fallback,
                                               log=log)
        _restore(state, run_dir / manifest['current']['files']['state']['name'],
                 optimizer=optimizer, scheduler=scheduler, ema=ema, scaler=scaler)
        start_epoch, best, history = state['epoch'] + 1, state['best'], state['history']
        if dist_info.is_main:
            ckpt.publish(run_dir, manifest, clean=False)  # what the manifest on disk names stays
            _write_summary(run_dir / 'summary.csv', history)
        log(f'resumed from {run_dir / ckpt.MANIFEST} at epoch {start_epoch + 1}')
        if start_epoch >= num_epochs:
            log(f'the run in {run_dir} is already complete ({num_epochs} epochs)')
    if dist_info.is_main:
        save_config(args, run_dir / 'config.yaml')

    ddp_model: nn.Module = model
    if dist_info.distributed:
        if args.sync_bn and dist_info.device.type == 'cuda':
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ddp_model = DistributedDataParallel(
            model, device_ids=[dist_info.device.index] if dist_info.device.type == 'cuda' else None)
    summary_path = run_dir / 'summary.csv'
    metrics: dict[str, float] = {k: v for k, v in history[-1].items() if k != 'epoch'} if history else {}
    t0 = time.time()
    for epoch in range(start_epoch, num_epochs):
        sampler.set_epoch(epoch)
        seed_everything(epoch_seed(args.seed, epoch, dist_info.rank))
        train_loader.generator.manual_seed(epoch_seed(args.seed, epoch, dist_info.rank))
        try:
            metrics = train_one_epoch(ddp_model, train_loader, task, optimizer, scheduler, epoch, args, dist_info,
                                      ema=ema, scaler=scaler)
        except FloatingPointError as e:
            if manifest is None or not args.resume:
                raise
            resumed = run_dir / manifest['current']['files']['weights']['name']
            raise FloatingPointError(f'{e}, after resuming from {resumed} (the checkpoint of epoch {start_epoch}): '
                                     'its weights or optimizer state may be damaged') from None
        metrics.update(task.evaluate(model, val_loader))
        if ema is not None:
            metrics.update({f'ema_{k}': v for k, v in task.evaluate(ema.module, val_loader).items()})
        is_best = metrics[task.best_key] > best['metric']
        if is_best:
            best = {'metric': metrics[task.best_key], 'epoch': epoch}
        history = [*history, {'epoch': epoch, **metrics}]
        if dist_info.is_main:
            manifest = ckpt.save_checkpoint(run_dir, model, {
                'epoch': epoch, 'best': best, 'config': config, 'history': history,
                'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
                'ema': ema.state_dict() if ema is not None else None,
                'scaler': scaler.state_dict() if scaler is not None else None},
                epochs=num_epochs, is_best=is_best, previous=manifest,
                metadata={task.best_key: f'{metrics[task.best_key]:.4f}'})
            _write_summary(summary_path, history)
        shown = ', '.join(f'{k} {v:.4g}' for k, v in metrics.items())
        log(f'epoch {epoch + 1}/{num_epochs} ({time.time() - t0:.0f}s): {shown}')
        barrier()
        if args.stop_after_epoch and epoch + 1 >= args.stop_after_epoch and epoch + 1 < num_epochs:
            log(f'stopping after epoch {epoch + 1} as asked; continue with --resume {run_dir}')
            break
    if dist_info.is_main and args.plot and summary_path.exists():
        plot_summary(summary_path, run_dir / 'summary.png', task.best_key)
    if metrics:
        log(f'final {task.best_key} {metrics[task.best_key]:.2f} (best {best["metric"]:.2f} at epoch '
            f'{best["epoch"] + 1}) after {time.time() - t0:.0f}s; outputs in {run_dir}')
    return dict(metrics, best=best['metric'])


def _restore(state: dict[str, Any], path: Path, **parts: Any) -> None:
    """Load the optimizer, scheduler, EMA and scaler states; one that does not fit names its entry."""
    for key, part in parts.items():
        if part is None:
            continue
        try:
            part.load_state_dict(state[key])
        except Exception as e:
            raise ckpt.CheckpointError(f'{path}: entry {key!r} does not fit this run ({ckpt.first_line(e)})'
                                       ) from None


def _write_summary(path: Path, history: list[dict[str, Any]]) -> None:
    """``summary.csv``, one row per epoch of ``history``, written atomically."""
    buf = io.StringIO(newline='')
    writer = csv.DictWriter(buf, fieldnames=list(history[0]) if history else ['epoch'], extrasaction='ignore')
    writer.writeheader()
    writer.writerows(history)
    ckpt.atomic_write(path, buf.getvalue().encode())
