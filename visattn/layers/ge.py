"""Gather-Excite (GE).

Paper: "Gather-Excite: Exploiting Feature Context in Convolutional Neural Networks", Hu, Shen, Albanie, Sun,
Vedaldi, NeurIPS 2018, arXiv:1810.12348 (https://arxiv.org/abs/1810.12348).

A gather operator ξG aggregates each channel over a spatial extent e into a map of ⌈H/e⌉ × ⌈W/e⌉ (one value
per channel for the global extent), and an excite operator redistributes it to the positions it came from,
``y = x ⊙ σ(interp(ξG(x)))``, where ``interp`` resizes back to H × W by nearest-neighbour interpolation. The
paper's three pairs:

- GE-θ⁻ (``extra_params=False``, parameter-free): ξG is average pooling with kernel 2e − 1 and stride e (the
  released schema: 15×15, stride 8 for e = 8), padding e − 1 so that it gives ⌈H/e⌉ cells; the average is over
  the pixels the window covers inside the map (timm's ``count_include_pad=False``). Global extent (``extent=0``):
  global average pooling, ``y = x ⊙ σ(GAP(x))``.
- GE-θ (``extra_params=True``): ξG is log2(e) depthwise 3×3 convolutions of stride 2 (padding 1, no bias), each
  followed by batch norm, with ReLU between them (not after the last). Global extent: one depthwise convolution
  whose kernel is the whole map (``feat_size``, no padding; 56 × 56 in ResNet-50's first stage), then batch
  norm, as the released RN50-GEP prototxt.
- GE-θ⁺ (``extra_params=True, use_mlp=True``): GE-θ's gather, then SE's excitation on the gathered map, a
  1×1-conv bottleneck C → C/16 → C with biases and ReLU, then the gate. The released RN50-GEPP prototxt puts a
  ReLU after the gather's batch norm, before the bottleneck (``gather_act``, default on for θ⁺); timm's
  ``GatherExcite`` has none there (``gather_act=False``).

The map is resized as ``torch.nn.functional.interpolate(mode='nearest')`` (timm's choice): position i of H takes
cell ⌊i·h/H⌋ of the h = ⌈H/e⌉ cells, which is ⌊i/e⌋ when e divides H. The gate is applied before the resize (the
same values, on the small map). Module names follow timm's ``GatherExcite`` (``gather.conv1``, ``gather.norm1``,
..., ``mlp.fc1``, ``mlp.fc2``), so its weights load as they are. Where timm departs: its default turns the MLP on
for the parameter-free gather (``use_mlp=True``: that is SE, not one of the paper's pairs; here the default is
GE-θ⁻, ``use_mlp=False``); its global parametric gather pads the full-map kernel by (k − 1)/2, so it is not
global (here: no padding, as the prototxt); and timm 1.0.31's module fails to build with the MLP or with
``extra_params`` (``*dd`` passed positionally).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_channels, check_int, check_nchw, get_act, reduced_channels
from ..registry import register


@register(
    'ge', paper='Gather-Excite: Exploiting Feature Context in Convolutional Neural Networks', arxiv='1810.12348',
    year=2018, family='spatial', complexity='O(N·C)',
)
class GatherExcite(nn.Module):
    """Gather-Excite block: GE-θ⁻ (default), GE-θ (``extra_params``) or GE-θ⁺ (``extra_params, use_mlp``).

    Args:
        channels: input and output channels C.
        extent: the extent ratio e: 0 (default) gathers globally; e >= 1 gathers each cell from about 2e − 1
            positions (a power of two with ``extra_params``; the paper uses 2, 4 and 8).
        extra_params: gather with strided depthwise convolutions and batch norm (GE-θ) instead of average
            pooling (GE-θ⁻, default False).
        use_mlp: excite through the SE bottleneck (GE-θ⁺ with ``extra_params``; default False).
        feat_size: H or (H, W) of the input, needed by the global parametric gather (its kernel); otherwise
            unused.
        rd_ratio, rd_channels, rd_divisor: bottleneck width of the MLP (default C/16).
        gather_act: ``act_layer`` after the parametric gather's last norm; None (default) applies it exactly
            when the MLP follows (GE-θ⁺, as the released code); False gives timm's module.
        act_layer: activation of the gather and the MLP (default ReLU).
        norm_layer: norm after each gather convolution (default BatchNorm2d; None for none).
        gate_layer: gating activation (default sigmoid).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W]; H × W must be ``feat_size`` for the global parametric gather, whose
        batch norm, over [B, C, 1, 1] vectors, needs B >= 2 in training mode.
    """

    def __init__(
            self,
            channels: int,
            *,
            extent: int = 0,
            extra_params: bool = False,
            use_mlp: bool = False,
            feat_size: int | tuple[int, int] | None = None,
            rd_ratio: float = 1 / 16,
            rd_channels: int | None = None,
            rd_divisor: int = 1,
            gather_act: bool | None = None,
            act_layer: type[nn.Module] | str = nn.ReLU,
            norm_layer: type[nn.Module] | None = nn.BatchNorm2d,
            gate_layer: type[nn.Module] | str = nn.Sigmoid,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.extent = check_int('extent', extent, 0)
        if feat_size is not None:
            feat_size = (feat_size, feat_size) if isinstance(feat_size, int) else tuple(feat_size)
            if len(feat_size) != 2:
                raise ValueError(f'feat_size must be an int or a pair (H, W), got {feat_size!r}')
            feat_size = (check_int('feat_size', feat_size[0]), check_int('feat_size', feat_size[1]))
        if gather_act and not extra_params:
            raise ValueError('gather_act applies to the parametric gather (extra_params=True), got gather_act=True '
                             'with extra_params=False')
        self.feat_size = feat_size
        # the map size (H, W) the global parametric gather's kernel needs; (0, 0) where there is none
        self.global_kernel: tuple[int, int] = feat_size if extra_params and extent == 0 and feat_size else (0, 0)
        self.pooled_norm = bool(extra_params and extent == 0 and norm_layer is not None)
        self.gather: nn.Sequential | None = None
        if extra_params:
            self.gather = self._parametric_gather(
                channels, extent, feat_size, use_mlp if gather_act is None else gather_act, act_layer, norm_layer, dd)
        rd = reduced_channels(channels, rd_ratio, rd_channels, rd_divisor)  # checked, also when unused
        if use_mlp:
            self.mlp: nn.Sequential | None = nn.Sequential(OrderedDict(
                fc1=nn.Conv2d(channels, rd, 1, **dd),
                act=get_act(act_layer, inplace=True),
                fc2=nn.Conv2d(rd, channels, 1, **dd),
            ))
        else:
            self.mlp = None
        self.gate = get_act(gate_layer)

    @staticmethod
    def _parametric_gather(channels: int, extent: int, feat_size: tuple[int, int] | None, last_act: bool, act_layer,
                           norm_layer, dd: dict) -> nn.Sequential:
        """GE-θ's gather: one full-map depthwise conv (global), or log2(e) stride-2 depthwise 3×3 convs."""
        if extent == 0:
            if feat_size is None:
                raise ValueError('feat_size (H, W) is needed by the global parametric gather (extra_params=True, '
                                 'extent=0): its depthwise kernel is the whole map; got None')
            convs = [nn.Conv2d(channels, channels, feat_size, groups=channels, bias=False, **dd)]
        else:
            if extent & (extent - 1):
                raise ValueError(f'extent must be 0 or a power of two with extra_params=True (log2(e) stride-2 '
                                 f'convolutions), got {extent}')
            n = int(math.log2(extent))
            convs = [nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels, bias=False, **dd)
                     for _ in range(n)]
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, conv in enumerate(convs, 1):
            layers[f'conv{i}'] = conv
            if norm_layer is not None:
                layers[f'norm{i}'] = norm_layer(channels, **dd)
            if i < len(convs) or last_act:
                layers[f'act{i}'] = get_act(act_layer, inplace=True)
        return nn.Sequential(layers)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'GatherExcite')
        H, W = x.shape[2], x.shape[3]
        if self.gather is not None:
            fh, fw = self.global_kernel
            if self.extent == 0 and (H != fh or W != fw):
                raise ValueError(f'GatherExcite: the global parametric gather has a {fh}×{fw} kernel (feat_size) and '
                                 f'needs maps of that size, got shape {list(x.shape)}')
            if self.pooled_norm and self.training and x.shape[0] < 2:
                raise ValueError(
                    'GatherExcite: the global gather normalises over the batch (BatchNorm over [B, C, 1, 1]) and '
                    f'needs a batch of at least 2 in training mode, got shape {list(x.shape)}; use eval()')
            g = self.gather(x)
        elif self.extent == 0:
            ct = torch.promote_types(x.dtype, torch.float32)
            g = (x.sum([2, 3], keepdim=True, dtype=ct) / (H * W)).to(x.dtype)  # [B, C, 1, 1]
        else:
            e = self.extent
            ct = torch.promote_types(x.dtype, torch.float32)
            g = F.avg_pool2d(x.to(ct), 2 * e - 1, e, e - 1, count_include_pad=False).to(x.dtype)
        if self.mlp is not None:
            g = self.mlp(g)
        g = self.gate(g)  # [B, C, ⌈H/e⌉, ⌈W/e⌉]
        if self.extent != 0:
            g = F.interpolate(g, size=[H, W], mode='nearest')
        return x * g
