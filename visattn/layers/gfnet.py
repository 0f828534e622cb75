"""Global filter (GFNet).

Paper: "Global Filter Networks for Image Classification", Rao, Zhao, Zhu, Lu, Zhou, NeurIPS 2021,
arXiv:2107.00645 (https://arxiv.org/abs/2107.00645).

The token mixer of GFNet, in place of self-attention: a 2-D discrete Fourier transform of each channel, an
element-wise product with a learnable complex filter, and the inverse transform,

    X = F(x),   X'[c, u, v] = K[u, v, c] · X[c, u, v],   y = F⁻¹(X'),

with ``F`` the real 2-D FFT over (H, W) (``rfft2``, ``norm='ortho'`` as the released code), so that
``u = 0 .. H - 1`` and ``v = 0 .. W // 2`` and ``K ∈ C^{H × (W//2+1) × C}`` is stored as its real and
imaginary parts, ``complex_weight`` [h, w // 2 + 1, C, 2] (the released code's name and layout, initialised
N(0, 0.02²) as there). ``F⁻¹`` is ``irfft2`` to (H, W): the spectrum is read as that of a real map, so the
imaginary parts of the ``v = 0`` column (and ``v = W / 2`` for even W) after the inverse transform along H are
dropped, ``y[h, w] = Re Σ_u Σ_v c_v X'[u, v] e^{2πi(uh/H + vw/W)} / √(HW)`` with ``c_v = 1`` at ``v = 0`` (and
``W / 2``), 2 elsewhere. The FFTs run in ``promote_types(x.dtype, float32)`` (``torch.fft`` has no bf16 on a CPU;
float64 stays float64), and the result is cast back to ``x``'s dtype. The paper's GFNet block wraps this filter as
``x + FFN(LN(GF(LN(x))))``; the norms, the FFN and the residual are the network's, not this block's.

The filter is sized for ``feat_size`` (default (14, 14): GFNet at 224² with 16² patches). Wherever the spectrum of
the map seen has the filter's shape (H, W // 2 + 1) the filter is used as it is. For another size it is
interpolated as the released code does when it fine-tunes at a higher resolution (``main_gfnet.py``: the
checkpoint's ``complex_weight`` resized with ``F.interpolate(mode='bicubic', align_corners=True)`` to
(H, H // 2 + 1)): the frequency-domain filter itself, real and imaginary parts as 2C channels of a
[h, w // 2 + 1] image, bicubic with ``align_corners=True`` (the four corners of the frequency grid stay where
they are; a size of 1 takes the first entry, the DC term), to (H, W // 2 + 1) for rectangular maps. Along H the
frequencies are in FFT order (0, 1, .., then the negative ones), and the interpolation runs over that order, as
the released code's does.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import Tensor

from .._utils import check_channels, check_feat_size, check_nchw
from ..registry import register

__all__ = ['GlobalFilter', 'GlobalFilterNHWC', 'global_filter', 'resize_global_filter']


def global_filter(x: Tensor, weight: Tensor, channels_last: bool = False) -> Tensor:
    """The global filter ``irfft2(rfft2(x) · K)`` of ``x`` [B, C, H, W] (or [B, H, W, C] with ``channels_last``)
    with ``weight`` [H, W // 2 + 1, C, 2] (real, imaginary), computed in at least float32; ``x``'s dtype and
    shape."""
    dt = torch.promote_types(x.dtype, torch.float32)
    dims = [1, 2] if channels_last else [2, 3]
    H, W = x.shape[dims[0]], x.shape[dims[1]]
    if x.numel() == 0:  # an empty batch (MKL's FFT refuses it)
        return x * 0
    spec = torch.fft.rfft2(x.to(dt), dim=dims, norm='ortho')
    k = torch.view_as_complex(weight.to(dt).contiguous())  # [H, W // 2 + 1, C]
    if not channels_last:
        k = k.permute(2, 0, 1)  # [C, H, W // 2 + 1]
    return torch.fft.irfft2(spec * k, s=[H, W], dim=dims, norm='ortho').to(x.dtype)


def resize_global_filter(weight: Tensor, height: int, width: int) -> Tensor:
    """``weight`` [h, w', C, 2] resized to the spectrum of an (height, width) map, [height, width // 2 + 1, C, 2]:
    as it is where the shape matches, else bicubic interpolation (``align_corners=True``) of the frequency-domain
    filter, as the released GFNet code does for fine-tuning at another resolution."""
    h, wf, C = weight.shape[0], weight.shape[1], weight.shape[2]
    size = (height, width // 2 + 1)
    if (h, wf) == size:
        return weight
    img = weight.reshape(h, wf, 2 * C).permute(2, 0, 1).unsqueeze(0)  # [1, 2C, h, w']
    img = img.to(torch.promote_types(weight.dtype, torch.float32))
    img = F.interpolate(img, size=size, mode='bicubic', align_corners=True)
    return img[0].permute(1, 2, 0).reshape(size[0], size[1], C, 2).to(weight.dtype)


@register(
    'gfnet', paper='Global Filter Networks for Image Classification', arxiv='2107.00645', year=2021,
    family='token-mixing', complexity='O(N·log N·C)',
)
class GlobalFilter(nn.Module):
    """GFNet's global filter layer.

    Args:
        channels: input and output channels C.
        feat_size: (H, W) (or one int for a square map) the filter is built for (default (14, 14)); other sizes
            get it interpolated (see the module docstring).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W], any H and W.
    """

    def __init__(
            self,
            channels: int,
            *,
            feat_size: int | tuple[int, int] = (14, 14),
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        self.channels = check_channels(channels)
        self.feat_size = check_feat_size('feat_size', feat_size)
        h, w = self.feat_size
        self.complex_weight = nn.Parameter(torch.empty(h, w // 2 + 1, channels, 2, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The released code's initialisation: N(0, 0.02²) for the real and imaginary parts."""
        nn.init.normal_(self.complex_weight, std=0.02)

    def filter_for(self, height: int, width: int) -> Tensor:
        """The filter [height, width // 2 + 1, C, 2] applied to an (height, width) map."""
        return resize_global_filter(self.complex_weight, height, width)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'GlobalFilter')
        return global_filter(x, self.filter_for(x.shape[2], x.shape[3]))

    def forward_nhwc(self, x: Tensor) -> Tensor:
        """The filter on a channels-last map ``x`` [B, H, W, C] -> [B, H, W, C] (GFNet's layout)."""
        return global_filter(x, self.filter_for(x.shape[1], x.shape[2]), channels_last=True)


@register_notrace_module
class GlobalFilterNHWC(GlobalFilter):
    """`GlobalFilter` on channels-last maps: ``forward`` is `forward_nhwc` (the layer of the GFNet models). A class
    of its own so that timm's ``torch.fx`` tracer keeps it a leaf module, as every visattn block.

    Shapes:
        x: [B, H, W, C] -> [B, H, W, C], any H and W.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-1] != self.channels:
            raise ValueError(f'GlobalFilterNHWC: x must be [B, H, W, {self.channels}], got shape {list(x.shape)}')
        return self.forward_nhwc(x)
