"""VOLO's outlook attention: every position predicts, from its own feature, the attention weights that mix the
values of its k×k window, and the windows' outputs are folded back (summed where they overlap).

Paper: "VOLO: Vision Outlooker for Visual Recognition", Yuan, Hou, Jiang, Feng, Yan, TPAMI 2022, arXiv:2106.13112
(https://arxiv.org/abs/2106.13112). timm: ``timm.models.volo.OutlookAttention`` (channels-last [B, H, W, C]).

With values ``V = W_v X`` and, for the window centred at position i of the (pooled) grid, per head n (eqs. 2-5):

    A_i = softmax_j(reshape(W_A x̄_i + b_A) / √d)         [N, k², k²]: window position a (row) mixes positions j
    Y_{i + o_a} += Σ_j A_i[n, a, j] · V_{i + o_j}           for every window i (Fold: overlapping windows add up)
    out = W_proj Y + b_proj

``x̄`` is X average-pooled by ``stride`` (s×s windows, ceil mode: a window cut by the border averages the pixels
inside), and the windows are those of an unfold with ``stride`` s and zero padding k//2: ceil(H/s) × ceil(W/s)
windows, the same grid as the pooled map; the fold returns to H × W. d = C/N is the head width (the logits are
scaled by d^-1/2, as the released code and timm do). Window positions outside the map are zero values, and a fold
drops their outputs (as the released code and timm: the weights are not renormalised to the positions inside).

Defaults: k = 3, padding 1, stride 1 (timm's ``OutlookAttention`` defaults; VOLO's stage-1 outlookers call it
with stride 2, timm's ``outlooker_blocks``: weights from 2×2-pooled tokens, windows every second token),
``qkv_bias=False`` for ``v`` (timm's and the released code's default). ``num_heads`` has no default in timm; here 8.
The parameter names ``v``, ``attn``, ``proj`` are timm's (``nn.Linear``), so timm's state dict loads as it is and,
on an NCHW map, this block computes timm's function (tested to float64 precision at any H×W, including sizes the
stride does not divide: timm pools in ceil mode there too). timm reshapes the pooled map onto the window grid, which
only agrees for ``padding = kernel_size // 2`` with an odd k; other paddings are refused here (they would give a
different number of windows than pooled positions). The three projections run as batched GEMMs on the NCHW map;
``forward_nhwc`` computes the same function on a channels-last map [B, H, W, C] (VOLO's layout, `visattn.models.volo`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_channels, check_int, check_nchw, check_odd, check_prob, softmax_fp32
from ..registry import register

__all__ = ['OutlookAttn']


def _pointwise(weight: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    """A linear layer over the channels of x [B, C, L]: ``W x + b`` [B, O, L], one batched GEMM in the NCHW
    layout (on CPU faster than a 1×1 convolution, and no transposes to channels-last)."""
    w = weight.expand(x.shape[0], -1, -1)
    if bias is None:
        return torch.bmm(w, x)
    return torch.baddbmm(bias[:, None], w, x)


@register(
    'outlook', paper='VOLO: Vision Outlooker for Visual Recognition', arxiv='2106.13112', year=2022,
    family='local', complexity='O(N·k²·(C + N_h·k²))',
)
class OutlookAttn(nn.Module):
    """Outlook attention on an NCHW map.

    Args:
        channels: channels C, divisible by ``num_heads``.
        num_heads: heads N (default 8).
        kernel_size: window k, odd (default 3).
        padding: zero padding of the windows; must be k // 2 (default None: k // 2).
        stride: s, the pooling of the attention branch and the stride of the windows (default 1).
        qkv_bias: bias in the value projection ``v`` (default False).
        attn_drop: dropout on the attention weights (default 0).
        proj_drop: dropout after the output projection (default 0).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
            self,
            channels: int,
            *,
            num_heads: int = 8,
            kernel_size: int = 3,
            padding: int | None = None,
            stride: int = 1,
            qkv_bias: bool = False,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        C = self.channels = check_channels(channels)
        self.num_heads = check_int('num_heads', num_heads)
        self.kernel_size = check_odd('kernel_size', kernel_size)
        self.stride = check_int('stride', stride)
        if padding is not None and check_int('padding', padding, 0) != kernel_size // 2:
            raise ValueError(
                f'padding must be kernel_size // 2 = {kernel_size // 2} (one window per pooled position), '
                f'got {padding}')
        self.padding = kernel_size // 2
        if C % num_heads:
            raise ValueError(f'num_heads must divide channels={C}, got {num_heads}')
        self.head_dim = C // num_heads
        self.scale = self.head_dim ** -0.5
        k2 = kernel_size * kernel_size
        self.v = nn.Linear(C, C, bias=qkv_bias, **dd)
        self.attn = nn.Linear(C, k2 * k2 * num_heads, **dd)
        self.attn_drop = nn.Dropout(check_prob('attn_drop', attn_drop))
        self.proj = nn.Linear(C, C, **dd)
        self.proj_drop = nn.Dropout(check_prob('proj_drop', proj_drop))
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'OutlookAttn')
        B, C, H, W = x.shape
        v = _pointwise(self.v.weight, self.v.bias, x.reshape(B, C, H * W)).view(B, C, H, W)
        L = (-(-H // self.stride)) * (-(-W // self.stride))  # windows = pooled positions
        logits = _pointwise(self.attn.weight, self.attn.bias, self.pool(x).reshape(B, C, L))
        k2 = self.kernel_size * self.kernel_size
        logits = logits.view(B, self.num_heads, k2, k2, L)
        y = self._fold(v, logits.permute(0, 1, 4, 2, 3)).to(x.dtype)
        return self.proj_drop(_pointwise(self.proj.weight, self.proj.bias, y.view(B, C, H * W)).view(B, C, H, W))

    def forward_nhwc(self, x: Tensor) -> Tensor:
        """The same function on a channels-last map, x: [B, H, W, C] -> [B, H, W, C] (the layout of VOLO's blocks:
        the projections are plain linear layers over the last dimension, no permuted copies of x or of the output).
        Not a module call: a ``torch.fx`` trace must treat the block that calls it as a leaf."""
        if x.dim() != 4 or x.shape[-1] != self.channels:
            raise ValueError(f'OutlookAttn.forward_nhwc: x must be [B, H, W, {self.channels}], got shape '
                             f'{list(x.shape)}')
        B, H, W, C = x.shape
        k2 = self.kernel_size * self.kernel_size
        v = self.v(x).permute(0, 3, 1, 2)  # [B, C, H, W] view
        pooled = self.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # [B, H/s, W/s, C]
        L = pooled.shape[1] * pooled.shape[2]
        logits = self.attn(pooled).reshape(B, L, self.num_heads, k2, k2).permute(0, 2, 1, 3, 4)
        y = self._fold(v, logits).to(x.dtype)  # [B, C, H, W]
        return self.proj_drop(self.proj(y.permute(0, 2, 3, 1)))

    def _fold(self, v: Tensor, logits: Tensor) -> Tensor:
        """The windows' weighted values folded back: v [B, C, H, W] (any strides), logits [B, N, L, a, j] ->
        [B, C, H, W] in ``promote_types(dtype, float32)``."""
        B, C, H, W = v.shape
        N, D, k, s, p = self.num_heads, self.head_dim, self.kernel_size, self.stride, self.padding
        k2 = k * k
        L = logits.shape[2]
        v = F.unfold(v, k, padding=p, stride=s).view(B, N, D, k2, L)  # [B, N, D, j, L]
        attn = self.attn_drop(softmax_fp32(logits * self.scale, dim=-1))
        y = attn @ v.permute(0, 1, 4, 3, 2).to(attn.dtype)  # [B, N, L, a, D]
        y = y.to(torch.promote_types(y.dtype, torch.float32)).permute(0, 1, 4, 3, 2).reshape(B, C * k2, L)
        return F.fold(y, (H, W), k, padding=p, stride=s)  # Σ over the windows covering each pixel
