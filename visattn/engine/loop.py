"""The training epoch shared by classification and segmentation: autocast, gradient accumulation (with
DDP's ``no_sync``), clipping, per-update scheduling and EMA."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from timm.utils import AverageMeter, ModelEmaV3
from torch import Tensor
from tqdm import tqdm

from .distributed import DistInfo, all_reduce_sum

AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``amp`` in ``'bf16'``/``'fp16'``; a null context for ``'none'``."""
    if amp == 'none':
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


@dataclass
class Task:
    """What differs between tasks: the model, the data, the loss of a batch and the evaluation.

    ``loss(model, images, targets) -> scalar``; ``evaluate(model, loader) -> {'eval_loss': ..., ...}``
    (already reduced across ranks); ``best_key`` is the metric that picks ``best.safetensors``.
    """

    model: nn.Module
    train_set: Any
    val_set: Any
    loss: Callable[[nn.Module, Tensor, Tensor], Tensor]
    evaluate: Callable[[nn.Module, Iterable], dict[str, float]]
    best_key: str
    num_classes: int
    samples_per_epoch: int | None = None
    val_batch_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def train_one_epoch(
        model: nn.Module,
        loader: Iterable,
        task: Task,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        epoch: int,
        args: Any,
        dist_info: DistInfo,
        ema: ModelEmaV3 | None = None,
        scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns ``{'train_loss', 'lr'}`` (the loss averaged over all ranks)."""
    model.train()
    meter = AverageMeter()
    num_batches = len(loader)
    updates_per_epoch = (num_batches + args.grad_accum - 1) // args.grad_accum
    num_updates = epoch * updates_per_epoch
    bar = tqdm(loader, desc=f'epoch {epoch + 1}', disable=not (args.progress and dist_info.is_main), leave=False)
    optimizer.zero_grad(set_to_none=True)
    for i, (images, targets) in enumerate(bar):
        images = images.to(dist_info.device, non_blocking=True)
        targets = targets.to(dist_info.device, non_blocking=True)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        last_micro = (i + 1) % args.grad_accum == 0 or i + 1 == num_batches
        sync = contextlib.nullcontext() if last_micro or not hasattr(model, 'no_sync') else model.no_sync()
        with sync:
            with autocast(dist_info.device, args.amp):
                loss = task.loss(model, images, targets)
            if not torch.isfinite(loss):
                raise FloatingPointError(f'loss is {loss.item()} at epoch {epoch + 1}, batch {i + 1}')
            scaled = loss / args.grad_accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        meter.update(loss.item(), images.shape[0])
        if not last_micro:
            continue
        if scaler is not None:
            scaler.unscale_(optimizer)
        if args.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        num_updates += 1
        if ema is not None:
            ema.update(model, step=num_updates)
        scheduler.step_update(num_updates=num_updates)
        bar.set_postfix(loss=f'{meter.avg:.4f}', lr=f'{optimizer.param_groups[0]["lr"]:.3g}')
    totals = all_reduce_sum(torch.tensor([meter.sum, meter.count], dtype=torch.float64, device=dist_info.device))
    return {'train_loss': (totals[0] / totals[1].clamp_min(1)).item(), 'lr': optimizer.param_groups[0]['lr']}
