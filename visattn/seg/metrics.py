"""Segmentation metrics from a confusion matrix: per-class IoU and accuracy, mIoU, pixel accuracy."""

from __future__ import annotations

import torch
from torch import Tensor


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Counts ``cm[t, p]`` of pixels of true class ``t`` predicted as ``p`` (``ignore_index`` pixels skipped).

    Args:
        pred: [...] integer predictions in [0, K).
        target: [...] integer labels in [0, K) or ``ignore_index``, same shape as ``pred``.

    Returns:
        [K, K] int64 (rows: ground truth, columns: prediction).
    """
    if pred.shape != target.shape:
        raise ValueError(f'pred and target must have the same shape, got {tuple(pred.shape)} and '
                         f'{tuple(target.shape)}')
    valid = target != ignore_index
    t, p = target[valid].long(), pred[valid].long()
    for name, v in (('target', t), ('pred', p)):
        if v.numel() and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(f'{name} values must be in [0, {num_classes}) or {ignore_index} (ignored), got '
                             f'values in [{v.min().item()}, {v.max().item()}]')
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_metrics(cm: Tensor) -> dict[str, Tensor | float]:
    """Metrics of a confusion matrix (rows: ground truth).

    Returns:
        ``iou`` [K] (NaN for a class absent from both labels and predictions), ``acc`` [K] per-class accuracy
        (NaN for a class absent from the labels), ``miou`` and ``macc`` (means over the non-NaN classes, in %),
        ``pixel_acc`` (correct / labelled pixels, in %).
    """
    cm = cm.double()
    tp = cm.diag()
    gt, predicted = cm.sum(1), cm.sum(0)
    union = gt + predicted - tp
    nan = torch.tensor(float('nan'), dtype=cm.dtype)
    iou = torch.where(union > 0, tp / union.clamp_min(1), nan)
    acc = torch.where(gt > 0, tp / gt.clamp_min(1), nan)
    total = cm.sum()
    return {
        'iou': iou, 'acc': acc, 'miou': 100 * iou.nanmean().item(), 'macc': 100 * acc.nanmean().item(),
        'pixel_acc': 100 * (tp.sum() / total).item() if total > 0 else float('nan'),
    }
