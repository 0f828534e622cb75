"""Detection bridge: torchvision's Faster R-CNN on a visattn backbone (features_only + torchvision's FPN)."""

from __future__ import annotations

from collections import OrderedDict

import timm
import torch
import torch.nn as nn
from torch import Tensor
from torchvision.models.detection import FasterRCNN
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

import visattn  # noqa: F401


class TimmFPN(nn.Module):
    """A timm ``features_only`` backbone (strides 4-32) with torchvision's FPN: what Faster R-CNN expects."""

    def __init__(self, name: str, out_channels: int = 64) -> None:
        super().__init__()
        self.body = timm.create_model(name, features_only=True, out_indices=(1, 2, 3, 4))
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), out_channels, LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def test_faster_rcnn_on_a_cbam_backbone_runs_forward_and_backward():
    model = FasterRCNN(
        TimmFPN('resnet18_cbam'), num_classes=3, min_size=64, max_size=64, rpn_pre_nms_top_n_train=50,
        rpn_post_nms_top_n_train=20, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=10,
        rpn_batch_size_per_image=32, box_batch_size_per_image=16, box_detections_per_img=5)
    images = [torch.rand(3, 64, 56), torch.rand(3, 48, 64)]
    targets = [{'boxes': torch.tensor([[10.0, 12.0, 40.0, 50.0]]), 'labels': torch.tensor([1])},
               {'boxes': torch.tensor([[5.0, 5.0, 30.0, 40.0], [30.0, 10.0, 60.0, 45.0]]),
                'labels': torch.tensor([2, 1])}]
    model.train()
    losses = model(images, targets)
    assert set(losses) == {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    cbam_grads = [p.grad for n, p in model.backbone.body.named_parameters() if '.se.' in n]
    assert cbam_grads and all(g is not None and torch.isfinite(g).all() for g in cbam_grads)
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for det in out:
        assert det['boxes'].shape[1:] == (4,) and len(det['boxes']) <= 5
        assert len(det['labels']) == len(det['scores']) == len(det['boxes'])
