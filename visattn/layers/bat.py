"""BAT: grouped bilinear attentional transforms, a non-local block that mixes rows and columns of blocks.

Paper: "Non-Local Neural Networks With Grouped Bilinear Attentional Transforms", Chi, Yuan, Yu, Wu, Shao, Huang,
CVPR 2020 (no arXiv version; https://openaccess.thecvf.com/content_CVPR_2020/html/Chi_Non-Local_Neural_Networks_With_Grouped_Bilinear_Attentional_Transforms_CVPR_2020_paper.html).
Released code: https://github.com/BA-Transform/BAT-Image-Classification (timm's ``BatNonLocalAttn`` adapts it).

The block is a residual ``x + Dropout2d(conv2(BA(conv1(x))))`` (``conv1`` / ``conv2``: 1×1 conv + BN + ReLU, to
``rd_channels`` and back). The bilinear attentional transform ``BA`` of a map ``z`` [C', H, W], with b = ``block_size``
and G = ``groups``, cuts the rows into b bands of t = H / b rows (and the columns into b bands of W / b) and

    u = ReLU(BN(W_1 z))                                         [G, H, W]
    P = σ(conv_p(maxpool_rows(u)))  [G, b, b],   P_ij <- P_ij / Σ_j P_ij     (conv_p: a b×1 conv to b²·G channels)
    Q = σ(conv_q(maxpool_cols(u)))  [G, b, b],   Q_kl <- Q_kl / Σ_k Q_kl     (conv_q: a 1×b conv)
    BA(z) = ReLU(BN(W_2 ((P ⊗ I_t) z_g (Q ⊗ I_t'))))              for the C' / G channels z_g of each group g

where ``maxpool_rows`` takes the maximum of u over each band of rows (b values per group) and ``P ⊗ I_t`` moves row
``j·t + a`` to row ``i·t + a`` with weight P_ij: a b×b attention between the bands, the same for every offset a
inside them. It is computed as two small batched matmuls on the [b, t] view of the rows and the [b, t'] view of the
columns, never forming the H×H and W×W matrices (timm builds them, expanded to every channel).

Any H×W (timm's asserts that b divides H and W): the map is zero-padded at the bottom/right to multiples of b
(t = ceil(H / b)); the band maxima are taken over image pixels only; a band made only of padding (when H < b, or H
just above a multiple of b) has the descriptor 0 and gets no weight in the normalisation of P (of Q for columns);
a band that is partly padding takes zeros for its padded rows, as a convolution's zero padding. Where b divides H
and W this is timm's ``BatNonLocalAttn`` exactly, with the same state-dict keys.

Defaults (timm's, from the released code): ``block_size=7``, ``groups=2``, ``rd_ratio=1/4`` rounded to a multiple of
8, dropout 0.2 on the residual branch, ReLU and batch norm.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ConvNormAct
from torch import Tensor

from .._utils import check_channels, check_int, check_nchw, check_prob, float_min, reduced_channels
from ..registry import register

__all__ = ['BatNonLocalAttn', 'BilinearAttnTransform']


def _band_max(u: Tensor, block: int, dim: int, valid: int) -> Tensor:
    """Maximum of ``u`` (padded to ``block`` bands of equal size along ``dim``, 2 or 3) over each band and the other
    spatial dim: [B, G, block]; bands from ``valid`` on (only padding) give 0."""
    B, G = u.shape[:2]
    u = u.unflatten(dim, (block, u.shape[dim] // block))  # [B, G, block, t, W] or [B, G, H, block, t]
    m = u.amax(dim=(3, 4)) if dim == 2 else u.amax(dim=(2, 4))
    return F.pad(m[:, :, :valid], (0, block - valid)) if valid < block else m


class BilinearAttnTransform(nn.Module):
    """The grouped bilinear attentional transform BA (see the module docstring).

    Args:
        channels: channels C' of the map it transforms (divisible by ``groups``).
        block_size: number b of bands along each axis.
        groups: G groups, each with its own P and Q.
        act_layer, norm_layer: of the 1×1 conv-norm-act layers.
        device, dtype: factory arguments.

    Shapes:
        x: [B, C', H, W] -> [B, C', H, W].
    """

    def __init__(
            self,
            channels: int,
            block_size: int,
            groups: int,
            act_layer: type[nn.Module] = nn.ReLU,
            norm_layer: type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.in_channels = check_channels(channels)
        self.block_size = check_int('block_size', block_size)
        self.groups = check_int('groups', groups)
        if channels % groups:
            raise ValueError(f'rd_channels={channels} must be divisible by groups={groups}')
        b = block_size
        self.conv1 = ConvNormAct(channels, groups, 1, act_layer=act_layer, norm_layer=norm_layer, **dd)
        self.conv_p = nn.Conv2d(groups, b * b * groups, kernel_size=(b, 1), **dd)
        self.conv_q = nn.Conv2d(groups, b * b * groups, kernel_size=(1, b), **dd)
        self.conv2 = ConvNormAct(channels, channels, 1, act_layer=act_layer, norm_layer=norm_layer, **dd)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        b, G = self.block_size, self.groups
        th, tw = math.ceil(H / b), math.ceil(W / b)  # rows / columns per band
        Hp, Wp = b * th, b * tw
        u = self.conv1(x)
        if Hp != H or Wp != W:
            u = F.pad(u, (0, Wp - W, 0, Hp - H), value=float_min(u.dtype))  # no padded pixel is a band maximum
            x = F.pad(x, (0, Wp - W, 0, Hp - H))
        nh, nw = math.ceil(H / th), math.ceil(W / tw)  # bands holding image pixels
        ct = torch.promote_types(x.dtype, torch.float32)
        p = self.conv_p(_band_max(u, b, 2, nh)[..., None]).view(B, G, b, b).to(ct).sigmoid()
        q = self.conv_q(_band_max(u, b, 3, nw)[:, :, None]).view(B, G, b, b).to(ct).sigmoid()
        if nh < b:
            p = p * (torch.arange(b, device=x.device) < nh).to(ct)  # padding-only source bands get no weight
        if nw < b:
            q = q * (torch.arange(b, device=x.device) < nw).to(ct)[:, None]
        p = (p / p.sum(dim=3, keepdim=True)).to(x.dtype)
        q = (q / q.sum(dim=2, keepdim=True)).to(x.dtype)
        # rows: y[i·t + a] = Σ_j P_ij x[j·t + a]; [B, G, C/G, b, t·Wp]
        y = p[:, :, None] @ x.reshape(B, G, C // G, b, th * Wp)
        # columns: y[:, l·t' + β] = Σ_k y[:, k·t' + β] Q_kl; [B, G, C/G, Hp, b, t']
        y = q.transpose(-1, -2)[:, :, None, None] @ y.reshape(B, G, C // G, Hp, b, tw)
        y = y.reshape(B, C, Hp, Wp)
        if Hp != H or Wp != W:
            y = y[:, :, :H, :W]
        return self.conv2(y)


@register(
    'bat', paper='Non-Local Neural Networks With Grouped Bilinear Attentional Transforms', arxiv='', year=2020,
    family='context', complexity='O(N·b·C)',
    paper_url='https://openaccess.thecvf.com/content_CVPR_2020/html/Chi_Non-Local_Neural_Networks_With_Grouped_'
              'Bilinear_Attentional_Transforms_CVPR_2020_paper.html',
)
class BatNonLocalAttn(nn.Module):
    """BAT non-local block: ``x + Dropout2d(conv2(BA(conv1(x))))``.

    Args:
        channels: input channels C.
        block_size: bands b along each axis of the bilinear transform (default 7).
        groups: groups G of the transform (default 2); divides ``rd_channels``.
        rd_ratio: width of the reduced map relative to C when ``rd_channels`` is not given (default 1/4).
        rd_channels: width of the reduced map.
        rd_divisor: ``rd_channels`` is rounded to a multiple of it (default 8).
        drop_rate: ``Dropout2d`` rate on the residual branch (default 0.2).
        act_layer, norm_layer: of the 1×1 conv-norm-act layers (default ReLU, BatchNorm2d).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
            self,
            channels: int,
            *,
            block_size: int = 7,
            groups: int = 2,
            rd_ratio: float = 0.25,
            rd_channels: int | None = None,
            rd_divisor: int = 8,
            drop_rate: float = 0.2,
            act_layer: type[nn.Module] = nn.ReLU,
            norm_layer: type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        check_int('block_size', block_size)
        check_int('groups', groups)
        rd = reduced_channels(channels, rd_ratio, rd_channels, rd_divisor, round_limit=0.9)  # timm's rounding
        drop_rate = check_prob('drop_rate', drop_rate)
        self.conv1 = ConvNormAct(channels, rd, 1, act_layer=act_layer, norm_layer=norm_layer, **dd)
        self.ba = BilinearAttnTransform(rd, block_size, groups, act_layer=act_layer, norm_layer=norm_layer, **dd)
        self.conv2 = ConvNormAct(rd, channels, 1, act_layer=act_layer, norm_layer=norm_layer, **dd)
        self.dropout = nn.Dropout2d(p=drop_rate)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'BatNonLocalAttn')
        return x + self.dropout(self.conv2(self.ba(self.conv1(x))))
