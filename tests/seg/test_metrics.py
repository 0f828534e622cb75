"""Confusion matrix, mIoU and pixel accuracy: a hand-checked case and a plain float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from visattn.seg import confusion_matrix, segmentation_metrics


def test_hand_checked_confusion_matrix():
    # 3 classes; 255 is ignored. Pixels (target -> pred):
    # 0->0, 0->0, 0->1, 1->1, 1->1, 1->2, 2->2, 255->0 (ignored), 2->0
    target = torch.tensor([[0, 0, 0], [1, 1, 1], [2, 255, 2]])
    pred = torch.tensor([[0, 0, 1], [1, 1, 2], [2, 0, 0]])
    cm = confusion_matrix(pred, target, 3)
    # rows = truth, columns = prediction, counted by hand from the list above
    assert cm.tolist() == [[2, 1, 0], [0, 2, 1], [1, 0, 1]]
    m = segmentation_metrics(cm)
    # IoU_c = tp / (row + column - tp): class 0: 2/(3+3-2), class 1: 2/(3+3-2), class 2: 1/(2+2-1)
    iou = [2 / 4, 2 / 4, 1 / 3]
    assert m['iou'].tolist() == pytest.approx(iou)
    assert m['miou'] == pytest.approx(100 * sum(iou) / 3)
    assert m['pixel_acc'] == pytest.approx(100 * 5 / 8)
    assert m['acc'].tolist() == pytest.approx([2 / 3, 2 / 3, 1 / 2])


def test_metrics_match_a_plain_reference_and_skip_absent_classes():
    k = 5
    target = torch.randint(0, k - 1, (2, 7, 9))  # class 4 never appears in the labels ...
    target[0, :2] = 255
    pred = torch.randint(0, k - 1, (2, 7, 9))  # ... nor in the predictions: its IoU is NaN and left out
    m = segmentation_metrics(confusion_matrix(pred, target, k))
    ious = []
    for c in range(k):
        valid = target != 255
        inter = ((pred == c) & (target == c) & valid).sum().item()
        union = (((pred == c) | (target == c)) & valid).sum().item()
        ious.append(inter / union if union else math.nan)
    assert math.isnan(m['iou'][4].item())
    assert m['iou'][:4].tolist() == pytest.approx(ious[:4])
    assert m['miou'] == pytest.approx(100 * sum(ious[:4]) / 4)
    valid = target != 255
    assert m['pixel_acc'] == pytest.approx(100 * ((pred == target) & valid).sum().item() / valid.sum().item())


def test_out_of_range_values_are_errors():
    with pytest.raises(ValueError, match='target values'):
        confusion_matrix(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 3, 255]), 3)
    with pytest.raises(ValueError, match='pred values'):
        confusion_matrix(torch.tensor([0, -1, 0, 0]), torch.zeros(4, dtype=torch.long), 3)
    with pytest.raises(ValueError, match='same shape'):
        confusion_matrix(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long), 3)
