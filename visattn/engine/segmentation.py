"""Segmentation: ADE20K-layout data, the encoder-decoder, the loss with the auxiliary head, mIoU evaluation."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..seg import (
    ADE20KDataset,
    EncoderDecoder,
    SegTrainTransform,
    SegValTransform,
    confusion_matrix,
    segmentation_metrics,
    slide_inference,
)
from .distributed import DistInfo, all_reduce_sum
from .loop import Task, autocast
from .models import load_pretrained, report_init_from, timm_base_name

IGNORE_INDEX = 255


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, num_classes: int, dist_info: DistInfo, args: Any,
             per_class_path: Any = None) -> dict[str, float]:
    """mIoU, mean class accuracy and pixel accuracy (in %) over the validation set, at each label's own size,
    from a confusion matrix summed across ranks; per-class IoU and accuracy go to ``per_class_path`` (CSV)."""
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=dist_info.device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=dist_info.device)
    for images, labels in loader:
        images, labels = images.to(dist_info.device), labels.to(dist_info.device)
        with autocast(dist_info.device, args.amp):
            if args.slide:
                logits = slide_inference(model, images, num_classes, args.crop_size, args.crop_size * 2 // 3)
            else:
                logits = model(images)
        logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode='bilinear', align_corners=False)
        valid = (labels != IGNORE_INDEX).sum()
        if valid > 0:
            loss_sum += torch.stack([F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction='sum')
                                     .double(), valid.double()])
        cm += confusion_matrix(logits.argmax(1), labels, num_classes, IGNORE_INDEX)
    cm = all_reduce_sum(cm)
    loss_sum = all_reduce_sum(loss_sum)
    m = segmentation_metrics(cm.cpu())
    if per_class_path is not None and dist_info.is_main:
        with open(per_class_path, 'w', newline='') as f:
            w = csv.writer(f)
            w.writerow(['class', 'iou', 'acc'])
            for c, (iou, acc) in enumerate(zip(m['iou'].tolist(), m['acc'].tolist())):
                w.writerow([c, f'{100 * iou:.2f}', f'{100 * acc:.2f}'])
    return {'eval_loss': (loss_sum[0] / loss_sum[1].clamp_min(1)).item(), 'eval_miou': m['miou'],
            'eval_macc': m['macc'], 'eval_acc': m['pixel_acc']}


def build_task(args: Any, dist_info: DistInfo, log: Any = print) -> Task:
    """The segmentation task of a run; ``--iters`` turns the run iteration-based (an "epoch" is
    ``--eval-interval`` iterations)."""
    num_classes = args.num_classes or 150
    train = ADE20KDataset(args.data_dir, args.train_split,
                          SegTrainTransform(args.crop_size, tuple(args.scale_range), args.hflip),
                          num_classes=num_classes, ignore_index=IGNORE_INDEX)
    val = ADE20KDataset(args.data_dir, args.val_split, SegValTransform(args.val_scale), num_classes=num_classes,
                        ignore_index=IGNORE_INDEX)
    samples = None
    if args.iters:
        args.epochs = math.ceil(args.iters / args.eval_interval)
        samples = args.eval_interval * args.batch_size * args.grad_accum
    base_weights = args.pretrained and timm_base_name(args.model) is not None
    model = EncoderDecoder(args.model, num_classes, head=args.head, head_channels=args.head_channels,
                           attn_kwargs=args.attn_kwargs, aux_head=args.aux_weight > 0,
                           output_stride=args.output_stride, pretrained=args.pretrained and not base_weights,
                           in_chans=args.in_chans)
    if base_weights:
        load_pretrained(model.backbone, args.model, log)
    if args.init_from:
        report_init_from(model.backbone, args.init_from, log)

    def loss(model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        out, aux = model(images, with_aux=True)
        value = F.cross_entropy(out.float(), labels, ignore_index=IGNORE_INDEX)
        if aux is not None:
            value = value + args.aux_weight * F.cross_entropy(aux.float(), labels, ignore_index=IGNORE_INDEX)
        return value

    from .runner import run_dir_of

    per_class = run_dir_of(args) / 'per_class.csv'
    return Task(
        model=model, train_set=train, val_set=val, loss=loss, best_key='eval_miou', num_classes=num_classes,
        samples_per_epoch=samples, val_batch_size=1,
        evaluate=lambda m, loader: evaluate(m, loader, num_classes, dist_info, args, per_class))
