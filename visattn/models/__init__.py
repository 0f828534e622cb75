"""Backbones registered with timm on import."""

from .resnet import AttnResNet, SKBottleneck

__all__ = ['AttnResNet', 'SKBottleneck']
