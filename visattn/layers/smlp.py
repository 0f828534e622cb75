"""Sparse MLP (sMLP) token mixer.

Paper: "Sparse MLP for Image Recognition: Is Self-Attention Really Necessary?", Tang, Zhao, Wang, Luo, Zeng, AAAI
2022, arXiv:2109.05422 (https://arxiv.org/abs/2109.05422).

The sMLP block mixes tokens along one axis at a time with weights shared across the other axis and the channels
(a sparse connection: each token sees its row and its column), then fuses the two mixed maps with the input:

    x_w[c, i, :] = W_w x[c, i, :] + b_w      (W_w ∈ R^{W×W}: along each row, shared by rows and channels)
    x_h[c, :, j] = W_h x[c, :, j] + b_h      (W_h ∈ R^{H×H}: along each column)
    y = Fuse([x, x_w, x_h])                  (a 1×1 convolution 3C → C without bias)

as the released code (microsoft/SPACH ``models/smlp.py``, ``sMLPBlock``: biased linear maps, an unbiased fuse, the
concatenation order identity, row mixing, column mixing; its ``proj_h`` mixes along W and ``proh_w`` along H, our
``proj_w`` and ``proj_h``). The released block starts with BatchNorm and GELU (a pre-activation); the paper's
sMLP equations do not, and neither does this block by default: ``norm_layer=nn.BatchNorm2d, act_layer='gelu'``
adds them. The fusion is computed as ``W_0 x + (W_1 x) W_wᵀ + W_h (W_2 x)`` plus the biases' terms
(``Fuse = [W_0 W_1 W_2]``; the channel and the spatial maps commute), without the 3C-channel concatenation.

The linear maps are built for ``feat_size`` (default (14, 14); sMLPNet's maps are 56, 28, 14, 7 at 224²). For an
(H, W) map of another size each is resized as a continuous kernel: ``W_h`` (h × h) is bilinearly interpolated as
an image to H × H (``align_corners=False``: pixel centres) and scaled by h / H, so that its row sums, the response
to a constant column, are kept (a mean over the column stays the mean); ``b_h`` is linearly interpolated to H.
Likewise W_w, b_w. At the built size the weights are used as they are.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_channels, check_feat_size, check_nchw, get_act
from ..registry import register

__all__ = ['SparseMlp', 'resize_axis_linear']


def resize_axis_linear(weight: Tensor, bias: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """An n × n token-mixing matrix and its bias [n] resized to ``size`` as a continuous kernel: bilinear
    (``align_corners=False``) and scaled by n / size; the bias linearly interpolated. Unchanged at ``size = n``."""
    n = weight.shape[0]
    if n == size:
        return weight, bias
    w = F.interpolate(weight[None, None], size=(size, size), mode='bilinear', align_corners=False)[0, 0]
    b = F.interpolate(bias[None, None], size=size, mode='linear', align_corners=False)[0, 0]
    return w * (n / size), b


@register(
    'smlp', paper='Sparse MLP for Image Recognition: Is Self-Attention Really Necessary?', arxiv='2109.05422',
    year=2022, family='token-mixing', complexity='O(N·(H + W)·C + N·C²)',
)
class SparseMlp(nn.Module):
    """sMLP block: row and column token mixing, fused with the identity by a 1×1 convolution.

    Args:
        channels: input and output channels C.
        feat_size: (H, W) (or one int) the row and column maps are built for (default (14, 14)); other sizes get
            them interpolated (see the module docstring).
        norm_layer: optional norm before the mixing (the released code: ``nn.BatchNorm2d``; default None).
        act_layer: optional activation after it (the released code: GELU; default None).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W], any H and W.
    """

    def __init__(
            self,
            channels: int,
            *,
            feat_size: int | tuple[int, int] = (14, 14),
            norm_layer: type[nn.Module] | None = None,
            act_layer: type[nn.Module] | str | None = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.feat_size = h, w = check_feat_size('feat_size', feat_size)
        self.norm = norm_layer(channels, **dd) if norm_layer is not None else nn.Identity()
        self.act = get_act(act_layer)
        self.proj_h = nn.Linear(h, h, **dd)
        self.proj_w = nn.Linear(w, w, **dd)
        self.fuse = nn.Conv2d(3 * channels, channels, 1, bias=False, **dd)

    def mixing_weights(self, height: int, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``W_h`` [height, height], ``b_h`` [height], ``W_w`` [width, width], ``b_w`` [width] for an
        (height, width) map."""
        wh, bh = resize_axis_linear(self.proj_h.weight, self.proj_h.bias, height)
        ww, bw = resize_axis_linear(self.proj_w.weight, self.proj_w.bias, width)
        return wh, bh, ww, bw

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'SparseMlp')
        B, C, H, W = x.shape
        x = self.act(self.norm(x))
        wh, bh, ww, bw = self.mixing_weights(H, W)
        fuse = self.fuse.weight.view(C, 3, C)  # [out, (identity, rows, columns), in]
        z = F.conv2d(x, fuse.transpose(0, 1).reshape(3 * C, C, 1, 1))  # [B, 3C, H, W]: W_0 x, W_1 x, W_2 x
        z0, z1, z2 = z[:, :C], z[:, C:2 * C], z[:, 2 * C:]
        bias = (fuse[:, 1].sum(1)[:, None, None] * bw + fuse[:, 2].sum(1)[:, None, None] * bh[:, None])  # [C, H, W]
        return z0 + torch.matmul(z1, ww.t()) + torch.matmul(wh, z2) + bias
