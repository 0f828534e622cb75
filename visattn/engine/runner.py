"""The run: set-up, the epoch loop, evaluation, checkpoints, ``summary.csv`` and the plot."""

from __future__ import annotations

import csv
import math
import random
import time
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
from .config import save_config
from .distributed import DistInfo, barrier, cleanup, init_distributed
from .loop import Task, train_one_epoch
from .plot import plot_summary

RESUME_KEYS = ('task', 'model', 'dataset', 'num_classes', 'in_chans', 'small_input_stem', 'head', 'epochs',
               'batch_size', 'grad_accum', 'opt', 'sched', 'seed', 'iters', 'eval_interval')


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
    name = args.experiment or f'{args.model}-{args.head + "-" if args.task == "segmentation" else ""}{args.dataset}'
    return Path(args.output) / name


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one epoch on one rank: each epoch's randomness (augmentation, mixup, dropout, loader
    workers) depends only on (seed, epoch, rank), so a resumed run repeats an uninterrupted one exactly."""
    return (seed * 1_000_003 + epoch * 1_009 + rank) % 2 ** 32


def _loaders(task: Task, args: Any, dist_info: DistInfo) -> tuple[DataLoader, DataLoader, EpochSampler]:
    sampler = EpochSampler(len(task.train_set), num_samples=task.samples_per_epoch, rank=dist_info.rank,
                           world_size=dist_info.world_size, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train = DataLoader(task.train_set, args.batch_size, sampler=sampler, num_workers=args.workers,
                       drop_last=task.extra.get('drop_last', False), generator=gen,
                       pin_memory=dist_info.device.type == 'cuda', persistent_workers=False)
    if len(train) == 0:
        raise ValueError(f'batch size {args.batch_size} is larger than the {len(sampler)} training samples per rank')
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
    run_dir = run_dir_of(args)
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(args, run_dir / 'config.yaml')
    log(f'{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters; '
        f'{len(task.train_set)} training / {len(task.val_set)} validation samples; '
        f'{dist_info.world_size} process(es) on {dist_info.device}; outputs in {run_dir}')

    train_loader, val_loader, sampler = _loaders(task, args, dist_info)
    updates_per_epoch = math.ceil(len(train_loader) / args.grad_accum)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        decay_rate=args.decay_rate, min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
        step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    scaler = torch.amp.GradScaler(dist_info.device.type) if args.amp == 'fp16' else None

    start_epoch, best = 0, {'metric': -math.inf, 'epoch': -1}
    if args.resume:
        state = ckpt.load_state(args.resume, model, {k: getattr(args, k) for k in RESUME_KEYS})
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        if ema is not None and state.get('ema') is not None:
            ema.load_state_dict(state['ema'])
        if scaler is not None and state.get('scaler') is not None:
            scaler.load_state_dict(state['scaler'])
        start_epoch, best = state['epoch'] + 1, state['best']
        if dist_info.is_main:
            _truncate_csv(run_dir / 'summary.csv', state['epoch'])
        log(f'resumed from {args.resume} at epoch {start_epoch}')

    ddp_model: nn.Module = model
    if dist_info.distributed:
        if args.sync_bn and dist_info.device.type == 'cuda':
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ddp_model = DistributedDataParallel(
            model, device_ids=[dist_info.device.index] if dist_info.device.type == 'cuda' else None)
    summary_path = run_dir / 'summary.csv'
    metrics: dict[str, float] = {}
    t0 = time.time()
    for epoch in range(start_epoch, num_epochs):
        sampler.set_epoch(epoch)
        seed_everything(epoch_seed(args.seed, epoch, dist_info.rank))
        train_loader.generator.manual_seed(epoch_seed(args.seed, epoch, dist_info.rank))
        metrics = train_one_epoch(ddp_model, train_loader, task, optimizer, scheduler, epoch, args, dist_info,
                                  ema=ema, scaler=scaler)
        metrics.update(task.evaluate(model, val_loader))
        if ema is not None:
            metrics.update({f'ema_{k}': v for k, v in task.evaluate(ema.module, val_loader).items()})
        is_best = metrics[task.best_key] > best['metric']
        if is_best:
            best = {'metric': metrics[task.best_key], 'epoch': epoch}
        if dist_info.is_main:
            row = {'epoch': epoch, **metrics}
            _append_csv(summary_path, row, new=epoch == 0 or not summary_path.exists())
            if is_best:
                ckpt.save_weights(model, run_dir / ckpt.BEST_WEIGHTS,
                                  metadata={'epoch': str(epoch), task.best_key: f'{metrics[task.best_key]:.4f}'})
            ckpt.save_state(run_dir, model, {
                'epoch': epoch, 'best': best, 'config': {k: getattr(args, k) for k in RESUME_KEYS},
                'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
                'ema': ema.state_dict() if ema is not None else None,
                'scaler': scaler.state_dict() if scaler is not None else None})
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


def _truncate_csv(path: Path, last_epoch: int) -> None:
    """Drop the rows after ``last_epoch`` (written by a run that stopped before saving its state)."""
    if not path.exists():
        return
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    keep = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= last_epoch]
    with open(path, 'w', newline='') as f:
        csv.writer(f).writerows(keep)


def _append_csv(path: Path, row: dict[str, Any], new: bool) -> None:
    if new:
        with open(path, 'w', newline='') as f:
            csv.DictWriter(f, fieldnames=list(row)).writeheader()
    with open(path, newline='') as f:
        fields = next(csv.reader(f))
    with open(path, 'a', newline='') as f:
        csv.DictWriter(f, fieldnames=fields, extrasaction='ignore').writerow(row)
