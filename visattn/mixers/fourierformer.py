"""FourierFormer: attention as a generalized Fourier integral estimator.

Paper: "FourierFormer: Transformer Meets Generalized Fourier Integral Theorem", Nguyen, Pham, Nguyen, Nguyen,
Osher, Ho, NeurIPS 2022, arXiv:2206.00206 (https://arxiv.org/abs/2206.00206). Code:
https://github.com/minhtannguyen/FourierFormer_NeurIPS (``imagenet/models.py`` and its CUDA kernel).

Attention read as a nonparametric regression: the softmax's Gaussian kernel density estimate of the keys is
replaced by the generalized Fourier integral estimator, a product over the D dimensions of a sinc kernel with
bandwidth R passed through φ(x) = x^p (p even, so the weights are non-negative; the released code: p = 4):

    a_ij = Π_d φ(sin(R (q_id - k_jd)) / (R (q_id - k_jd))) / Σ_j' Π_d φ(...),    out_i = Σ_j a_ij v_j

(the constants ``R^D / A^D`` of the estimator cancel in the normalisation). R is one learnable scalar per layer,
initialised to 1 (the released code), q and k are not scaled. The weights are formed in the log domain,
``p Σ_d log|sinc(R Δ_d)|`` (``|sinc|`` floored at the smallest normal float, so an exact zero of the kernel stays
finite with a zero gradient), and normalised by the masked softmax of `visattn.mixers._base`: stable where the
product of D sincs underflows, exact under any mask, zeros for a row that sees no key (the released code divides
by ``Σ_j a_ij + 1e-6`` instead).

Cost: a dense kernel, O(N²·D) per head, in transcendental functions (a sine and a logarithm per query, key and
channel, where softmax attention has one exponential per query and key), so several times slower than ``full``
at any length (registered with the kernel attentions of the ``linear`` family, but quadratic). In all O(N²·C) and
an N×N weight matrix, like full attention; the ``[n, N, D]`` differences are formed for blocks of queries
(``block_elements``), so inference memory is O(N² + ·), while training keeps them for the backward, O(N²·D) (the
released CUDA kernel recomputes them instead).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_float, check_int, float_tiny
from ..ops._dispatch import upcast
from ..registry import register
from ._base import TokenMixer, masked_softmax

__all__ = ['FourierFormerAttention', 'fourier_logits']


def fourier_logits(q: Tensor, k: Tensor, radius: Tensor, power: int, block_elements: int = 1 << 20) -> Tensor:
    """``p Σ_d log|sinc(R (q_id - k_jd))|`` for q [B, H, N, D], k [B, H, M, D] -> [B, H, N, M].

    ``sinc(x) = sin(x) / x`` (1 at 0; written out, about 4x cheaper on a CPU than ``torch.sinc``). Queries are
    taken in blocks of about ``block_elements`` differences.
    """
    B, H, N, D = q.shape
    M = k.shape[2]
    step = max(1, block_elements // max(1, B * H * M * D))
    tiny = float_tiny(q.dtype)
    r = radius.to(q.dtype)
    blocks: list[Tensor] = []
    for start in range(0, N, step):
        z = (q[:, :, start:start + step, None, :] - k[:, :, None, :, :]) * r  # [B, H, n, M, D]
        zero = z == 0  # sin(z) / z with its limit 1 at 0 (and a zero, not NaN, gradient there)
        safe = torch.where(zero, torch.ones_like(z), z)
        sinc = torch.where(zero, torch.ones_like(z), torch.sin(safe) / safe)
        blocks.append(power * torch.log(sinc.abs().clamp_min(tiny)).sum(-1))
    if len(blocks) == 1:
        return blocks[0]
    return torch.cat(blocks, dim=2)


@register(
    'fourierformer', paper='FourierFormer: Transformer Meets Generalized Fourier Integral Theorem',
    arxiv='2206.00206', year=2022, family='linear', complexity='O(N²·C)', kind='mixer', supports_causal=True,
)
class FourierFormerAttention(TokenMixer):
    """Generalized Fourier integral attention (see the module docstring).

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`; ``attn_drop`` drops attention weights).
        radius: initial R > 0 (default 1, the released code's).
        learn_radius: R is a learnable parameter (default True, the released code); False keeps it a buffer.
        power: the even power p of φ(x) = x^p (default 4, the released code's).
        block_elements: query differences formed at once (default 2^20: blocks that stay in cache).
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask``: [B, N] bool key padding or any mask broadcastable to
        [B, H, N, N] (SDPA's convention; a float mask is added to the log-weights).
    """

    supports_key_padding = True
    supports_dense_mask = True
    supports_causal = True

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            scale_norm: bool = False,
            proj_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            norm_layer: type[nn.Module] | None = None,
            *,
            radius: float = 1.,
            learn_radius: bool = True,
            power: int = 4,
            block_elements: int = 1 << 20,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        radius = check_float('radius', radius, 0., low_open=True)
        self.power = check_int('power', power, 2)
        if self.power % 2:
            raise ValueError(f'power must be an even int >= 2 (non-negative weights), got {power!r}')
        self.block_elements = check_int('block_elements', block_elements)
        init = torch.full((1,), radius, device=device, dtype=dtype)
        if learn_radius:
            self.radius = nn.Parameter(init)
        else:
            self.register_buffer('radius', init)

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        logits = fourier_logits(upcast(q), upcast(k), self.radius, self.power, self.block_elements)
        weights = masked_softmax(logits, key_padding_mask, attn_mask, is_causal)
        return (self.attn_drop(weights) @ v.to(weights.dtype)).to(v.dtype)
