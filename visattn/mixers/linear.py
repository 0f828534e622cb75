"""Kernelised (linear-complexity) attention: ``out = φ(Q) (φ(K)ᵀ V)``, never forming the N×N matrix.

- ``linear``: "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention", Katharopoulos,
  Vyas, Pappas, Fleuret, ICML 2020, arXiv:2006.16236. ``φ(x) = elu(x) + 1``,
  ``out_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ / φ(q_i)ᵀ Σ_j φ(k_j)``; causal by prefix sums over j <= i.
- ``efficient``: "Efficient Attention: Attention with Linear Complexities", Shen, Zhang, Zhao, Yi, Li,
  WACV 2021, arXiv:1812.01243. ``E(Q, K, V) = ρ_q(Q) (ρ_k(K)ᵀ V)`` with ``ρ_q`` a softmax over each query's
  features and ``ρ_k`` a softmax over the positions of each key feature (the paper's softmax normalisation;
  ``normalization='scaling'`` gives its scaling variant ``Q / √N``, ``K / √N``).
- ``fast``: "Real-time Semantic Segmentation with Fast Attention", Hu, Li, Ma, Wang, Lin, Hsu, Li, Shen,
  RA-L 2021, arXiv:2007.03815. ``FA(Q, K, V) = 1/N · Q̂ (K̂ᵀ V)`` with q and k l2-normalised over their
  features (cosine similarity in place of the softmax).
- ``performer``: FAVOR+, "Rethinking Attention with Performers", Choromanski et al., ICLR 2021,
  arXiv:2009.14794. Positive orthogonal random features ``φ(x) = exp(ωᵀx - |x|²/2) / √m`` of
  ``x = D^{-1/4} q`` approximate the softmax kernel; the projection ω can be redrawn during training.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_int, float_min
from ..ops import linear_attention
from ..ops._dispatch import upcast
from ..ops.linear.naive import linear_attention_naive
from ..registry import register
from ._base import TokenMixer

__all__ = ['EfficientAttention', 'FastAttention', 'LinearAttention', 'Performer', 'orthogonal_gaussian']


def _linear(fq: Tensor, fk: Tensor, v: Tensor, causal: bool = False, eps: float = 1e-6) -> Tensor:
    """`visattn.ops.linear_attention` on features ``fq``, ``fk`` (v taken to their dtype), returned in v's dtype.

    Scripted, the op's PyTorch reference (TorchScript compiles neither keyword-only arguments nor the Triton
    autograd function): the same computation.
    """
    if torch.jit.is_scripting():
        return linear_attention_naive(fq, fk, v.to(fq.dtype), causal, eps).to(v.dtype)
    return linear_attention(fq, fk, v.to(fq.dtype), causal=causal, eps=eps).to(v.dtype)


def _zero_padding(t: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    """Zero the padded tokens of ``t`` [B, H, N, D] (``key_padding_mask`` [B, N], True = real)."""
    return t if key_padding_mask is None else t * key_padding_mask[:, None, :, None].to(t.dtype)


class _KernelAttention(TokenMixer):
    """A mixer whose ``attend`` is ``linear_attention(φ_q(q), φ_k(k), v)`` with padded keys' features zeroed."""

    supports_key_padding = True
    eps: float = 1e-6
    __constants__ = TokenMixer.__constants__ + ['eps']

    def features(self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(φ(q), φ(k))`` [B, H, N, F]."""
        raise NotImplementedError

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        fq, fk = self.features(q, k, key_padding_mask)
        fk = _zero_padding(fk, key_padding_mask)
        out = _linear(fq, fk, v, causal=is_causal, eps=self.eps)
        return self.attn_drop(out)


@register(
    'linear', paper='Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention',
    arxiv='2006.16236', year=2020, family='linear', complexity='O(N·C²/H)', kind='mixer', backends=('torch', 'triton'),
    supports_causal=True,
)
class LinearAttention(_KernelAttention):
    """Linear attention with ``φ(x) = elu(x) + 1``; causal by prefix sums.

    Args:
        dim, num_heads, ...: as `TokenMixer` (``attn_drop`` drops the mixed values; there are no weights).

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask`` [B, N] bool key padding (True = real token).
    """

    supports_causal = True

    def features(self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return F.elu(q) + 1, F.elu(k) + 1


@register(
    'efficient', paper='Efficient Attention: Attention with Linear Complexities', arxiv='1812.01243', year=2018,
    family='linear', complexity='O(N·C²/H)', kind='mixer', backends=('torch', 'triton'),
)
class EfficientAttention(TokenMixer):
    """Efficient attention ``ρ_q(Q) (ρ_k(K)ᵀ V)``.

    With the softmax normalisation every row of ``ρ_q(Q)`` and every column of ``ρ_k(K)`` sums to one, so the
    normaliser of `linear_attention` is exactly one and this is that function on ``(ρ_q(Q), ρ_k(K))``.

    Args:
        dim, num_heads, ...: as `TokenMixer`.
        normalization: ``'softmax'`` (default, the paper's main form) or ``'scaling'`` (``ρ(Y) = Y / √N``).

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask`` [B, N] bool key padding (N counts the real tokens).
    """

    supports_key_padding = True

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
            normalization: str = 'softmax',
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        if normalization not in ('softmax', 'scaling'):
            raise ValueError(f"normalization must be 'softmax' or 'scaling', got {normalization!r}")
        self.normalization = normalization

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        q, logits = upcast(q), upcast(k)
        if self.normalization == 'scaling':
            return self.attn_drop(_mean_mix(q, logits, v, key_padding_mask))
        rq = torch.softmax(q, dim=-1)
        if key_padding_mask is not None:
            logits = logits.masked_fill(~key_padding_mask[:, None, :, None], float_min(logits.dtype))
        rk = _zero_padding(torch.softmax(logits, dim=-2), key_padding_mask)  # softmax over positions
        return self.attn_drop(_linear(rq, rk, v))


def _mean_mix(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    """``q (kᵀ v) / n`` over the n real keys: [B, H, N, Dv] in v's dtype (computed in q's dtype)."""
    k = _zero_padding(k, key_padding_mask)
    out = q @ (k.transpose(-2, -1) @ v.to(q.dtype))
    if key_padding_mask is None:
        return (out / q.shape[-2]).to(v.dtype)
    return (out / key_padding_mask.sum(-1).clamp_min(1)[:, None, None, None]).to(v.dtype)


@register(
    'fast', paper='Real-time Semantic Segmentation with Fast Attention', arxiv='2007.03815', year=2020,
    family='linear', complexity='O(N·C²/H)', kind='mixer',
)
class FastAttention(TokenMixer):
    """Fast attention ``1/N · Q̂ (K̂ᵀ V)``, q and k l2-normalised over their features.

    The scores ``q̂·k̂`` may be negative, so the sum is divided by the key count N rather than by a kernel
    normaliser (with a padding mask, N counts the real keys).

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask`` [B, N] bool key padding.
    """

    supports_key_padding = True

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        q, k = F.normalize(upcast(q), dim=-1), F.normalize(upcast(k), dim=-1)
        return self.attn_drop(_mean_mix(q, k, v, key_padding_mask))


def orthogonal_gaussian(
        rows: int, cols: int, *, scaling: str = 'norm', generator: torch.Generator | None = None,
        device=None, dtype=None,
) -> Tensor:
    """[rows, cols] random matrix whose blocks of ``cols`` rows are orthogonal (FAVOR+'s ORF).

    Args:
        rows: number of random features m.
        cols: dimension D of the projected vectors.
        scaling: ``'norm'`` rescales each row to the norm of a D-dim Gaussian vector (chi-distributed, the
            paper's choice: marginally Gaussian rows), ``'sqrt'`` to √D.
        generator: random generator (drawn on the CPU).
        device, dtype: of the result; a ``'meta'`` device gives an empty tensor.
    """
    if torch.device(device or 'cpu').type == 'meta':
        return torch.empty(rows, cols, device=device, dtype=dtype)
    blocks = []
    for _ in range(math.ceil(rows / cols)):
        g = torch.randn(cols, cols, generator=generator)
        qm, r = torch.linalg.qr(g)
        blocks.append((qm * torch.sign(torch.diagonal(r))).T)  # sign fix: Haar-distributed
    w = torch.cat(blocks)[:rows]
    if scaling == 'norm':
        norms = torch.randn(rows, cols, generator=generator).norm(dim=1, keepdim=True)
    elif scaling == 'sqrt':
        norms = torch.full((rows, 1), math.sqrt(cols))
    else:
        raise ValueError(f"scaling must be 'norm' or 'sqrt', got {scaling!r}")
    return (w * norms).to(device=device, dtype=dtype)


@register(
    'performer', paper='Rethinking Attention with Performers', arxiv='2009.14794', year=2020, family='linear',
    complexity='O(N·m·C/H)', kind='mixer', backends=('torch', 'triton'), supports_causal=True,
)
class Performer(_KernelAttention):
    """FAVOR+ attention: positive orthogonal random features approximating the softmax kernel.

    ``φ(x) = exp(ωᵀx - |x|²/2) / √m`` with ``x = q · D^{-1/4}`` (and k likewise), so that
    ``E[φ(q)·φ(k)] = exp(q·k / √D)``. For numerical range the factor ``exp(-|ω_i|²/2)`` is moved from every
    query feature to every key feature (the products are unchanged; a key feature becomes
    ``exp(-|k - ω_i|²/2) <= 1``), and each query's largest exponent is subtracted (a per-query constant that
    cancels in the normaliser). Neither depends on other tokens, so the causal form sees no future token.

    Args:
        dim, num_heads, ...: as `TokenMixer`.
        nb_features: random features m (default ``round(D · ln D)``, the paper's code default).
        feature_redraw_interval: in training, draw a new ω every this many forward calls (None: never).
        scaling: row norms of ω (see `orthogonal_gaussian`).

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask`` [B, N] bool key padding.
    """

    supports_causal = True
    eps = 1e-30  # the features are not rescaled by other tokens, so the normaliser may be small but exact

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
            nb_features: int | None = None,
            feature_redraw_interval: int | None = 1000,
            scaling: str = 'norm',
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        D = self.head_dim
        default = max(1, round(D * math.log(D)))
        self.nb_features = default if nb_features is None else check_int('nb_features', nb_features)
        if feature_redraw_interval is not None:
            check_int('feature_redraw_interval', feature_redraw_interval)
        self.feature_redraw_interval = feature_redraw_interval
        self.scaling = scaling
        self.register_buffer('projection', orthogonal_gaussian(
            self.nb_features, D, scaling=scaling, device=device, dtype=dtype))
        self.calls_since_redraw = 0

    @torch.no_grad()
    def redraw_projection(self) -> None:
        """Draw a new ω (in place)."""
        self.projection.copy_(orthogonal_gaussian(*self.projection.shape, scaling=self.scaling))
        self.calls_since_redraw = 0

    def features(self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        q, k = upcast(q), upcast(k)
        w = self.projection.to(q.dtype)  # the compute dtype of the input, whatever the buffer's
        c = self.head_dim ** -0.25
        q, k = q * c, k * c
        half_w = w.square().sum(-1) / 2  # |ω_i|²/2 [m]: moved from the key features to the query features
        lq = q @ w.T - q.square().sum(-1, keepdim=True) / 2 + half_w  # [B, H, N, m]
        lk = k @ w.T - k.square().sum(-1, keepdim=True) / 2 - half_w  # = -|k - ω_i|²/2 <= 0: no overflow
        ratio = self.nb_features ** -0.5
        return ratio * torch.exp(lq - lq.amax(-1, keepdim=True).detach()), ratio * torch.exp(lk)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if self.training and self.feature_redraw_interval is not None:
            if self.calls_since_redraw >= self.feature_redraw_interval:
                if torch.jit.is_scripting():  # TorchScript cannot compile the draw (QR of a seeded Gaussian)
                    raise RuntimeError(
                        'a scripted Performer cannot redraw its projection in training: call redraw_projection() '
                        'from Python, or build it with feature_redraw_interval=None')
                else:
                    self.redraw_projection()
            self.calls_since_redraw += 1
        kpm, dense = self.check_input(x, attn_mask, is_causal)  # TokenMixer.forward (TorchScript has no super())
        q, k, v = self.split_heads(x)
        return self.merge_heads(self.attend(q, k, v, kpm, dense, is_causal))
