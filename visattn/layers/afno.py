"""Adaptive Fourier Neural Operator (AFNO).

Paper: "Adaptive Fourier Neural Operators: Efficient Token Mixers for Transformers", Guibas, Mardani, Li, Tao,
Anandkumar, Catanzaro, ICLR 2022, arXiv:2111.13587 (https://arxiv.org/abs/2111.13587).

A token mixer in the Fourier domain whose channel mixing is a shared, block-diagonal complex MLP, with a soft
threshold that makes the spectrum sparse:

    X = F(x)                                         (rfft2 over (H, W), norm='ortho')
    Z1 = ReLU_ri(X · W1 + b1),   Z2 = Z1 · W2 + b2   (per frequency, over the channels, block-diagonal)
    y = F⁻¹(S_λ(Z2)) + x

``W1 = W1r + i W1i`` is block-diagonal with ``num_blocks`` (k = 8) blocks of size C/k × f·C/k
(``hidden_size_factor`` f = 1), ``W2`` likewise f·C/k × C/k, the biases complex; ``ReLU_ri`` and the soft
threshold ``S_λ(z) = sign(z) · max(|z| - λ, 0)`` (``sparsity_threshold`` λ = 0.01) act on the real and the
imaginary parts separately. These are the equations of the released ``AFNO2D`` (NVlabs/AFNO-transformer,
``afno/afno2d.py``), whose parameter names and layout (``w1`` [2, k, C/k, f·C/k], ``b1`` [2, k, f·C/k], ``w2``,
``b2``; N(0, 0.02²)) this block keeps, so that its state dict loads. ``hard_thresholding_fraction`` (1.0: keep
every mode) keeps, as the released code, the first ``int((W // 2 + 1) · fraction)`` frequencies along the
half-spectrum axis (all along H) and zeroes the others after the MLP; when none is kept the output is ``x``.
``F⁻¹`` is ``irfft2`` to (H, W), which reads the spectrum as that of a real map (see ``visattn.layers.gfnet``).
The residual ``+ x`` is the released code's ``return x + bias`` (``bias = x``). The transforms and the MLP run in
``promote_types(x.dtype, float32)`` (the released code: float32), the result is cast back to ``x``'s dtype before
the residual. Any H × W: nothing in the block depends on the size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_channels, check_float, check_int, check_nchw
from ..registry import register

__all__ = ['AFNO2d', 'afno_2d']


def _complex(p: Tensor, dt: torch.dtype) -> Tensor:
    """[2, ...] (real, imaginary) -> a complex tensor [...] of the complex dtype of ``dt``."""
    p = p.to(dt)
    return torch.complex(p[0], p[1])


def _relu_ri(z: Tensor) -> Tensor:
    """ReLU of the real and the imaginary parts separately."""
    return torch.view_as_complex(F.relu(torch.view_as_real(z)))


def afno_2d(
        x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, sparsity_threshold: float,
        hard_thresholding_fraction: float = 1.0, channels_last: bool = False,
) -> Tensor:
    """AFNO's spectral term ``F⁻¹(S_λ(MLP(F(x))))`` (without the residual) of ``x`` [B, C, H, W] (or [B, H, W, C]
    with ``channels_last``), with the released code's parameters ``w1`` [2, k, C/k, f·C/k], ``b1`` [2, k, f·C/k],
    ``w2`` [2, k, f·C/k, C/k], ``b2`` [2, k, C/k]; computed in at least float32, returned in ``x``'s dtype."""
    dt = torch.promote_types(x.dtype, torch.float32)
    dims = [1, 2] if channels_last else [2, 3]
    H, W = x.shape[dims[0]], x.shape[dims[1]]
    kept = int((W // 2 + 1) * hard_thresholding_fraction)
    if kept < 1 or x.numel() == 0:  # no mode kept, or an empty batch (MKL's FFT refuses it)
        return x * 0
    nb, bs = w1.shape[1], w1.shape[2]
    spec = torch.fft.rfft2(x.to(dt), dim=dims, norm='ortho')
    if kept < W // 2 + 1:
        spec = spec.narrow(dims[1], 0, kept)  # the dropped modes are zero: irfft2 pads them back
    B, Hf, Wk = spec.shape[0], spec.shape[dims[0]], spec.shape[dims[1]]
    cw1, cw2 = _complex(w1, dt), _complex(w2, dt)
    cb1, cb2 = _complex(b1, dt), _complex(b2, dt)
    if channels_last:
        z = spec.reshape(B, Hf, Wk, nb, bs)
        z = _relu_ri(torch.einsum('bhwki,kio->bhwko', z, cw1) + cb1)
        z = torch.einsum('bhwki,kio->bhwko', z, cw2) + cb2
        z = z.reshape(B, Hf, Wk, nb * bs)
    else:
        z = spec.reshape(B, nb, bs, Hf, Wk)
        z = _relu_ri(torch.einsum('bkihw,kio->bkohw', z, cw1) + cb1[:, :, None, None])
        z = torch.einsum('bkihw,kio->bkohw', z, cw2) + cb2[:, :, None, None]
        z = z.reshape(B, nb * bs, Hf, Wk)
    if sparsity_threshold > 0:
        z = torch.view_as_complex(F.softshrink(torch.view_as_real(z), sparsity_threshold))
    return torch.fft.irfft2(z, s=[H, W], dim=dims, norm='ortho').to(x.dtype)


@register(
    'afno', paper='Adaptive Fourier Neural Operators: Efficient Token Mixers for Transformers', arxiv='2111.13587',
    year=2022, family='token-mixing', complexity='O(N·log N·C + N·C²/k)',
)
class AFNO2d(nn.Module):
    """AFNO token mixer with its residual, ``y = x + F⁻¹(S_λ(MLP(F(x))))``.

    Args:
        channels: input and output channels C, a multiple of ``num_blocks``.
        num_blocks: blocks k of the block-diagonal weights (default 8).
        sparsity_threshold: λ of the soft threshold (default 0.01; 0 turns it off).
        hard_thresholding_fraction: fraction of the half-spectrum modes kept, in (0, 1] (default 1.0: all).
        hidden_size_factor: width factor f of the MLP's hidden layer (default 1).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W], any H and W.
    """

    def __init__(
            self,
            channels: int,
            *,
            num_blocks: int = 8,
            sparsity_threshold: float = 0.01,
            hard_thresholding_fraction: float = 1.0,
            hidden_size_factor: int = 1,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.num_blocks = nb = check_int('num_blocks', num_blocks)
        if channels % nb:
            raise ValueError(f'num_blocks must divide channels = {channels}, got {nb}')
        self.sparsity_threshold = check_float('sparsity_threshold', sparsity_threshold, 0.)
        self.hard_thresholding_fraction = check_float(
            'hard_thresholding_fraction', hard_thresholding_fraction, 0., 1., low_open=True)
        self.hidden_size_factor = f = check_int('hidden_size_factor', hidden_size_factor)
        bs = channels // nb
        self.w1 = nn.Parameter(torch.empty(2, nb, bs, bs * f, **dd))
        self.b1 = nn.Parameter(torch.empty(2, nb, bs * f, **dd))
        self.w2 = nn.Parameter(torch.empty(2, nb, bs * f, bs, **dd))
        self.b2 = nn.Parameter(torch.empty(2, nb, bs, **dd))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The released code's initialisation: every parameter N(0, 0.02²)."""
        for p in (self.w1, self.b1, self.w2, self.b2):
            nn.init.normal_(p, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'AFNO2d')
        return x + afno_2d(x, self.w1, self.b1, self.w2, self.b2, self.sparsity_threshold,
                           self.hard_thresholding_fraction)
