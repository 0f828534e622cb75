"""Classification: data (the built-in digits or an ImageNet-layout folder), model, loss and evaluation."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import Tensor
from torchvision import transforms as T

from ..data import DigitsDataset, checked_image_folder
from .distributed import DistInfo, all_reduce_sum
from .loop import Task, autocast
from .models import build_classifier


def build_datasets(args: Any, model_cfg: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """Training and validation datasets of ``args.dataset`` (``'digits'`` or ``'folder'``)."""
    if args.dataset == 'digits':
        train_tf = T.RandomCrop(8, padding=args.shift) if args.shift else None
        return DigitsDataset('train', transform=train_tf, seed=0), DigitsDataset('val', seed=0)
    cfg = model_cfg or {}
    common = dict(input_size=(args.in_chans, args.img_size, args.img_size), interpolation='bilinear',
                  mean=cfg.get('mean', (0.485, 0.456, 0.406)), std=cfg.get('std', (0.229, 0.224, 0.225)))
    train_tf = create_transform(is_training=True, hflip=args.hflip, color_jitter=args.color_jitter,
                                auto_augment=args.aa, re_prob=args.reprob, **common)
    val_tf = create_transform(is_training=False, crop_pct=args.crop_pct, **common)
    train = checked_image_folder(args.data_dir, args.train_split, train_tf)
    val = checked_image_folder(args.data_dir, args.val_split, val_tf, classes=train.classes)
    return train, val


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, dist_info: DistInfo, amp: str = 'none') -> dict[str, float]:
    """Cross-entropy, top-1 and top-5 accuracy (in %) over the whole validation set, summed across ranks."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=dist_info.device)  # loss, top1, top5, count
    for images, targets in loader:
        images, targets = images.to(dist_info.device), targets.to(dist_info.device)
        with autocast(dist_info.device, amp):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices == targets[:, None]
        sums += torch.stack([
            F.cross_entropy(logits, targets, reduction='sum').double(), topk[:, 0].sum().double(),
            topk.any(1).sum().double(), torch.tensor(float(len(targets)), device=sums.device, dtype=sums.dtype)])
    loss, top1, top5, n = all_reduce_sum(sums).tolist()
    n = max(n, 1)
    return {'eval_loss': loss / n, 'eval_top1': 100 * top1 / n, 'eval_top5': 100 * top5 / n}


def build_task(args: Any, dist_info: DistInfo, log: Any = print) -> Task:
    """The classification task of a run."""
    pretrained_cfg = timm.models.get_pretrained_cfg(args.model)
    cfg = pretrained_cfg.to_dict() if pretrained_cfg is not None else None
    train, val = build_datasets(args, cfg)
    num_classes = args.num_classes or len(train.classes)
    if num_classes < len(train.classes):
        raise ValueError(f'--num-classes {num_classes} is smaller than the {len(train.classes)} classes of the data')
    if args.dataset == 'digits' and args.in_chans != 1:
        raise ValueError(f'the digits are single-channel images: use --in-chans 1, got {args.in_chans}')
    model = build_classifier(args, num_classes, log)
    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                      num_classes=num_classes)
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif args.smoothing:
        criterion = LabelSmoothingCrossEntropy(args.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    def loss(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        if mixup is not None:
            images, targets = mixup(images, targets)
        return criterion(model(images), targets)

    return Task(
        model=model, train_set=train, val_set=val, loss=loss, best_key='eval_top1', num_classes=num_classes,
        evaluate=lambda m, loader: evaluate(m, loader, dist_info, args.amp), extra={'drop_last': mixup is not None})
