"""Semantic segmentation: decode heads, the encoder-decoder, the ADE20K dataset and mIoU."""

from .dataset import ADE20KDataset, SegTrainTransform, SegValTransform
from .heads import (
    HEADS,
    AttnHead,
    ConvBNReLU,
    DAHead,
    FCNHead,
    HamHead,
    ISAHead,
    MixedPooling,
    SPHead,
    create_head,
    list_heads,
)
from .metrics import confusion_matrix, segmentation_metrics
from .model import EncoderDecoder, create_backbone, slide_inference

__all__ = [
    'ADE20KDataset', 'AttnHead', 'ConvBNReLU', 'DAHead', 'EncoderDecoder', 'FCNHead', 'HEADS', 'HamHead', 'ISAHead',
    'MixedPooling', 'SPHead', 'SegTrainTransform',
    'SegValTransform', 'confusion_matrix', 'create_backbone', 'create_head', 'list_heads', 'segmentation_metrics',
    'slide_inference',
]
