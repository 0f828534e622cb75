"""Encoder-decoder for semantic segmentation over any timm/visattn backbone (``features_only=True``)."""

from __future__ import annotations

import warnings
from typing import Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..models._hub import create_pretrained
from .heads import FCNHead, create_head


def create_backbone(name: str, *, output_stride: int = 8, pretrained: bool = False, in_chans: int = 3,
                    **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, features_only=True)`` giving the last two feature levels (stage 3 and 4 of a
    ResNet), dilated to ``output_stride`` where the backbone allows it (otherwise its own stride, with a
    warning)."""
    common = dict(features_only=True, out_indices=(-2, -1), in_chans=in_chans, **kwargs)
    create = create_pretrained if pretrained else timm.create_model
    if output_stride == 32:
        return create(name, **common)
    try:
        return create(name, output_stride=output_stride, **common)
    except (TypeError, AssertionError, ValueError) as e:
        warnings.warn(f'{name} cannot be dilated to output stride {output_stride} ({e}); using its own stride',
                      stacklevel=2)
        return create(name, **common)


class EncoderDecoder(nn.Module):
    """Backbone → decode head on the last feature level (+ auxiliary FCN head on the one before), upsampled
    bilinearly to the input size.

    Args:
        backbone: a timm/visattn model name, or a module returning a list of feature maps with ``feature_info``.
        num_classes: classes K.
        head: decode head name (``fcn``, ``cc``, ``da``, ``ema``, ``external``, ``nl``, ``issa``, ``ham``,
            ``strip``, or any registered block).
        head_channels: width of the decode head (default 512).
        attn_kwargs: keyword arguments of the head's attention block.
        aux_head: add the auxiliary FCN head (256 channels) on the second-to-last level (default True).
        output_stride: backbone output stride (default 8; dilation where the backbone allows).
        pretrained: load timm's published backbone weights.
        in_chans: input channels (default 3).

    Shapes:
        x: [B, in_chans, H, W] -> logits [B, K, H, W]; with ``with_aux=True`` (training) a pair
        ``(logits, aux_logits or None)``.
    """

    def __init__(
            self,
            backbone: str | nn.Module,
            num_classes: int,
            *,
            head: str = 'fcn',
            head_channels: int = 512,
            attn_kwargs: dict[str, Any] | None = None,
            aux_head: bool = True,
            output_stride: int = 8,
            pretrained: bool = False,
            in_chans: int = 3,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if isinstance(backbone, str):
            factory = {k: v for k, v in dd.items() if v is not None}  # not every timm model takes device/dtype
            backbone = create_backbone(backbone, output_stride=output_stride, pretrained=pretrained,
                                       in_chans=in_chans, **factory)
        if not hasattr(backbone, 'feature_info'):
            raise TypeError('backbone must be a model name or a features_only module with feature_info')
        self.backbone = backbone
        chs = backbone.feature_info.channels()
        self.decode_head = create_head(head, chs[-1], num_classes, channels=head_channels, attn_kwargs=attn_kwargs,
                                       **dd)
        self.aux_head = FCNHead(chs[-2], num_classes, channels=256, **dd) if aux_head and len(chs) > 1 else None

    def forward(self, x: Tensor, with_aux: bool = False) -> Tensor | tuple[Tensor, Tensor | None]:
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f'x must be a [B, C, H, W] tensor, got {getattr(x, "shape", type(x).__name__)}')
        feats = self.backbone(x)
        size = x.shape[-2:]
        out = F.interpolate(self.decode_head(feats[-1]), size=size, mode='bilinear', align_corners=False)
        if not with_aux:
            return out
        aux = None
        if self.aux_head is not None:
            aux = F.interpolate(self.aux_head(feats[-2]), size=size, mode='bilinear', align_corners=False)
        return out, aux


@torch.no_grad()
def slide_inference(model: nn.Module, x: Tensor, num_classes: int, crop: int, stride: int) -> Tensor:
    """Logits of ``x`` from overlapping ``crop``×``crop`` windows ``stride`` apart, averaged where they overlap
    (images smaller than a window are zero-padded).

    Shapes:
        x: [B, C, H, W] -> [B, num_classes, H, W].
    """
    if not 0 < stride <= crop:
        raise ValueError(f'stride must be in (0, crop={crop}], got {stride}')
    b, _, h, w = x.shape
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    xp = F.pad(x, (0, pw, 0, ph))
    hp, wp = xp.shape[-2:]
    logits = x.new_zeros(b, num_classes, hp, wp, dtype=torch.float32)
    count = x.new_zeros(1, 1, hp, wp, dtype=torch.float32)
    rows = list(range(0, hp - crop, stride)) + [hp - crop]
    cols = list(range(0, wp - crop, stride)) + [wp - crop]
    for top in rows:
        for left in cols:
            logits[:, :, top:top + crop, left:left + crop] += model(xp[:, :, top:top + crop, left:left + crop]).float()
            count[:, :, top:top + crop, left:left + crop] += 1
    return (logits / count)[:, :, :h, :w]
