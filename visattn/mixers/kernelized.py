"""Kernelized Transformer: linear attention with a learned kernel (random features of a learned spectral density).

Paper: "Learning the Transformer Kernel" (arXiv title "On Learning the Transformer Kernel"), Chowdhury, Solomou,
Dubey, Sachan, TMLR 2022, arXiv:2110.08323 (https://arxiv.org/abs/2110.08323). Code:
https://github.com/cs1160701/OnLearningTheKernel.

The kernel of every head is learned through its spectral distribution (Bochner): random frequencies are drawn
from a learned distribution by reparameterisation of fixed standard normal samples ε [D, m], and the attention is
the linear attention of the resulting random features,
``y_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ / (φ(q_i)ᵀ Σ_j φ(k_j) + eps)``, with ``x = D^{-1/4} q`` (and k).

- ``kernel='rks'`` (GMM-RKS, the default; the code's ``mix-gauss-fourier``): per head h a Gaussian with a learned
  mean μ_h [D] and a learned full covariance factor Σ_h [D, D], symmetrised (ω = Σ_hᵀ ε ± μ_h, so that the kernel is
  real); random kitchen sinks ``φ(x) = m^{-1/2} [cos(ω₊ᵀx), cos(ω₋ᵀx), sin(ω₊ᵀx), sin(ω₋ᵀx)]`` and one constant
  feature s (the code's "smoothing", default 1; None: none), so that
  ``E[φ(q)·φ(k)] = 2 exp(-|Σ_h (q - k)|²/2) cos(μ_hᵀ(q - k)) + s²`` (positive on average; an estimate can be
  negative, and the normaliser keeps the op's eps).
- ``kernel='prf'`` (GMM-PRF, the code's ``mix-gauss-positive``): ω = μ_h + exp(σ_h / 2) ⊙ ε with a learned mean
  and log-variance [D] per head, positive random features ``φ(x) = m^{-1/2} exp(ωᵀx - |x|²)`` (the Gaussian kernel
  ``exp(-|q - k|²/2)`` when μ = 0, σ = 0). For range, ``exp(|ω|²/4)`` is moved from the key features to the query
  features (key features become ``exp(-|x - ω/2|²) <= 1``) and each query's largest exponent is subtracted (a
  per-query constant that cancels in the normaliser): nothing depends on other tokens, so causal and padded calls
  stay exact.

The heads are the mixture components (one Gaussian per head, as the released code). The samples ε are drawn from
``seed`` (kept in the state dict), so the module is a deterministic function; ``redraw_each_forward=True`` draws
new ones at every training forward, as the released code (which also redraws in evaluation). Parameters are
initialised as the released code (Xavier-uniform covariance factors, uniform means); the causal form is
prefix-sum linear attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_float, check_int
from ..ops._dispatch import upcast
from ..registry import register
from ._sparse_utils import SeededMixin, hash_normal
from .linear import _KernelAttention

__all__ = ['KernelizedAttention']


@register(
    'kernelized', paper='Learning the Transformer Kernel', arxiv='2110.08323', year=2022, family='linear',
    complexity='O(N·m·C/H)', kind='mixer', supports_causal=True,
)
class KernelizedAttention(SeededMixin, _KernelAttention):
    """Linear attention with random features of a learned spectral distribution (see the module docstring).

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`; ``attn_drop`` drops the mixed values).
        kernel: ``'rks'`` (GMM-RKS, default) or ``'prf'`` (GMM-PRF).
        nb_features: random frequencies m per head (default ``round(D · ln D)``; the released code uses the
            power of two nearest to it). RKS gives 4m + 1 features, PRF m.
        smoothing: the constant RKS feature s > 0 (default 1, the released code's; None for none).
        seed: seed of ε (default None: drawn from torch's generator at construction; see `SeededMixin`).
        redraw_each_forward: draw new ε at every training forward (default False).
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask``: [B, N] bool key padding (True = real token), exact.
    """

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
            kernel: str = 'rks',
            nb_features: int | None = None,
            smoothing: float | None = 1.,
            seed: int | None = None,
            redraw_each_forward: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        if kernel not in ('rks', 'prf'):
            raise ValueError(f"kernel must be 'rks' or 'prf', got {kernel!r}")
        self.kernel = kernel
        self.eps = 1e-30 if kernel == 'prf' else 1e-6  # PRF: query features rescaled per query, as `Performer`
        D = self.head_dim
        default = max(1, round(D * math.log(D)))
        self.nb_features = default if nb_features is None else check_int('nb_features', nb_features)
        self.smoothing = None if smoothing is None else check_float('smoothing', smoothing, 0., low_open=True)
        self.init_seed(seed)
        self.redraw_each_forward = redraw_each_forward
        self.mean = nn.Parameter(torch.empty(num_heads, D, device=device, dtype=dtype))
        shape = (num_heads, D, D) if kernel == 'rks' else (num_heads, D)
        self.sigma = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))  # Σ_h (rks) or log σ_h² (prf)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.sigma.device.type == 'meta':
            return
        nn.init.xavier_uniform_(self.sigma)
        fan_in = self.sigma[0].numel() if self.sigma.dim() == 3 else self.sigma.shape[1]
        bound = fan_in ** -0.5
        nn.init.uniform_(self.mean, -bound, bound)

    def noise(self, like: Tensor) -> Tensor:
        """The standard normal samples ε [D, m] in ``like``'s dtype and device."""
        shape = [self.head_dim, self.nb_features]
        if self.redraw_each_forward and self.training:
            return torch.randn(shape, device=like.device, dtype=like.dtype)
        return hash_normal(self.seed, shape).to(like.device, like.dtype)

    def frequencies(self, like: Tensor) -> Tensor:
        """The random frequencies ω [H, D, m] (RKS: ω₊ = Σᵀε + μ; PRF: μ + exp(σ/2) ε)."""
        eps = self.noise(like)
        mean, sigma = self.mean.to(like.dtype), self.sigma.to(like.dtype)
        if self.kernel == 'rks':
            return torch.einsum('hsd,sm->hdm', sigma, eps) + mean[..., None]
        return mean[..., None] + torch.exp(sigma / 2)[..., None] * eps

    def features(self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        q, k = upcast(q), upcast(k)
        c = self.head_dim ** -0.25
        q, k = q * c, k * c
        omega = self.frequencies(q)  # [H, D, m]
        m = self.nb_features
        if self.kernel == 'rks':
            both = torch.cat([omega, omega - 2 * self.mean.to(q.dtype)[..., None]], dim=-1)  # [ω₊, ω₋] [H, D, 2m]
            return self._rks(q, both, m), self._rks(k, both, m)
        lq = torch.einsum('bhnd,hdm->bhnm', q, omega) - q.square().sum(-1, keepdim=True)
        quarter = omega.square().sum(1)[None, :, None, :] / 4  # |ω|²/4 [1, H, 1, m]
        lq = lq + quarter
        lk = torch.einsum('bhnd,hdm->bhnm', k, omega) - k.square().sum(-1, keepdim=True) - quarter
        ratio = m ** -0.5
        return ratio * torch.exp(lq - lq.amax(-1, keepdim=True).detach()), ratio * torch.exp(lk)

    def _rks(self, x: Tensor, both: Tensor, m: int) -> Tensor:
        """``[cos u, sin u] / √m`` of ``u = xᵀ[ω₊, ω₋]`` and the constant feature, [B, H, N, 4m (+ 1)]."""
        u = torch.einsum('bhnd,hdm->bhnm', x, both)
        ratio = m ** -0.5
        smoothing = self.smoothing
        if smoothing is None:
            return torch.cat([torch.cos(u), torch.sin(u)], dim=-1) * ratio
        return torch.cat([torch.cos(u), torch.sin(u), torch.full_like(u[..., :1], smoothing / ratio)], dim=-1) * ratio
