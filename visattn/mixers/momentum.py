"""Momentum linear attention (Momentum Transformer).

Paper: "Momentum Transformer: Closing the Performance Gap Between Self-attention and Its Linearization", Nguyen,
Baraniuk, Kirby, Osher, Wang, MSML 2022 (PMLR 190), arXiv:2208.00579 (https://arxiv.org/abs/2208.00579). Code:
https://github.com/minhtannguyen/momentum-transformer-code-submission.

Causal linear attention (``φ(x) = elu(x) + 1``) is a gradient-descent step on its state per token,
``S_i = S_{i-1} + φ(k_i) v_iᵀ``; the momentum transformer adds heavy-ball momentum to that state:

    P_i = μ P_{i-1} - γ φ(k_i) v_iᵀ,    S_i = S_{i-1} - P_i,    z_i = z_{i-1} + φ(k_i),
    y_i = φ(q_i)ᵀ S_i / (φ(q_i)ᵀ z_i + eps),

(the released recurrent code: the normaliser ``z`` has no momentum). Unrolled, key j reaches query i with the
weight ``γ w(i - j)``, ``w(d) = Σ_{t<=d} μ^t = (1 - μ^{d+1}) / (1 - μ)``. It is computed here in chunks, exactly,
with no ``1/(1 - μ)`` cancellation: inside a chunk through the masked weights ``w(a - b)``, across chunks through
``w(a + b + 1) = w(a) + μ^{a+1} w(b)`` on two states (the plain prefix state and the momentum state), the latter
carried from chunk to chunk by a decay ``μ^L`` per chunk of L tokens (a scan of N / L steps). O(N·(L + D)·Dv)
time and memory.

Non-causal (the paper's non-autoregressive form): every query reads the state after the whole sequence,
``y_i = φ(q_i)ᵀ S_N / φ(q_i)ᵀ z_N``, so key j has the weight ``γ w(N - 1 - j)``.

``weights='final'`` gives the released parallel (training) code instead, which scales every key by its weight at
the last position, ``γ w(N - 1 - j)``, also in the causal form (then a query's weights depend on the length N,
never on later tokens' values).

Padding (``attn_mask`` [B, N]): padded tokens write nothing (their features are zeroed; the released code does
the same), so they never reach a real output; the recurrence still steps through them (the momentum decays there).

Not implemented: the paper's adaptive momentum, and its momentum on the residual connections (outside a token
mixer). The released LRA code of the non-causal form drops the normaliser (``Q (Kᵀ V)`` with q, k scaled by
``N^{-1/4}``); the normalised form above is the paper's linear attention.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_float, check_int
from ..ops._dispatch import upcast
from ..registry import register
from ._base import TokenMixer
from .linear import _linear, _zero_padding

__all__ = ['MomentumAttention', 'momentum_weights']


def momentum_weights(n: int, mu: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``w(d) = Σ_{t<=d} μ^t`` for ``d = 0 .. n-1``: [n]."""
    return torch.cumsum(torch.pow(mu, torch.arange(n, device=device, dtype=dtype)), dim=0)


def causal_momentum_attention(
        fq: Tensor, fk: Tensor, v: Tensor, mu: float, stepsize: float, eps: float = 1e-6, chunk: int = 64,
) -> Tensor:
    """``y_i = γ φ(q_i)ᵀ Σ_{j<=i} w(i - j) φ(k_j) v_jᵀ / (φ(q_i)ᵀ Σ_{j<=i} φ(k_j) + eps)``, in chunks.

    Args:
        fq, fk: [B, H, N, F] features (non-negative); v: [B, H, N, Dv].
        mu, stepsize: μ in (0, 1) and γ > 0.
        eps: added to the normaliser.
        chunk: chunk length L.

    Returns:
        [B, H, N, Dv] in ``fq``'s dtype.
    """
    n = fq.shape[2]
    pad = (-n) % chunk
    if pad:
        fq, fk, v = (F.pad(t, (0, 0, 0, pad)) for t in (fq, fk, v))
    # [B, H, N, D] -> [B, H, C, L, D]: C chunks of length L
    q, k, v = (t.unflatten(2, (-1, chunk)) for t in (fq, fk, v.to(fq.dtype)))
    C, L = q.shape[2], chunk
    w = momentum_weights(L, mu, q.device, q.dtype)  # w(0 .. L-1)
    pos = torch.arange(L, device=q.device)
    gap = pos[:, None] - pos[None, :]  # a - b inside a chunk
    intra = w[gap.clamp_min(0)] * (gap >= 0).to(w.dtype)  # w(a - b) for b <= a, else 0
    scores = torch.einsum('bhcik,bhcjk->bhcij', q, k)
    num = torch.einsum('bhcij,bhcjv->bhciv', scores * intra, v)
    den = (scores * (gap >= 0).to(scores.dtype)).sum(-1)
    plain = torch.einsum('bhclk,bhclv->bhckv', k, v)  # Σ_{j in c} φ(k_j) v_jᵀ
    # exclusive prefix over the chunks as a shift of the inclusive sum (an exact shift: later chunks cannot move it)
    plain_before = F.pad(plain.cumsum(2)[:, :, :-1], (0, 0, 0, 0, 1, 0))
    ksum_before = F.pad(k.sum(3).cumsum(2)[:, :, :-1], (0, 0, 1, 0))
    # momentum state at the end of each chunk: S(c) = μ^L S(c-1) + w(L-1) P(c-1) + Σ_{j in c} w(L-1-j) φ(k_j) v_jᵀ
    local = torch.einsum('bhclk,bhclv->bhckv', k * w.flip(0)[:, None], v)
    drive = local + w[L - 1] * plain_before
    decay = mu ** L
    state = torch.zeros_like(drive[:, :, 0])
    befores: list[Tensor] = []
    for c in range(C):  # a scan over the N / L chunks, each step a [B, H, F, Dv] update
        befores.append(state)
        state = decay * state + drive[:, :, c]
    momentum_before = torch.stack(befores, dim=2)  # S(c - 1) for each chunk c
    ahead = torch.pow(mu, (pos + 1).to(q.dtype))  # μ^{a+1}
    num = num + w[:, None] * torch.einsum('bhcik,bhckv->bhciv', q, plain_before) \
        + ahead[:, None] * torch.einsum('bhcik,bhckv->bhciv', q, momentum_before)
    den = den + torch.einsum('bhcik,bhck->bhci', q, ksum_before)
    out = stepsize * num / (den[..., None] + eps)
    return out.flatten(2, 3)[:, :, :n]


@register(
    'momentum', paper='Momentum Transformer: Closing the Performance Gap Between Self-attention and Its '
    'Linearization', arxiv='2208.00579', year=2022, family='linear', complexity='O(N·C²/H)', kind='mixer',
    supports_causal=True,
)
class MomentumAttention(TokenMixer):
    """Linear attention with heavy-ball momentum on its state (see the module docstring).

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`; ``attn_drop`` drops the mixed values).
        mu: momentum μ in (0, 1) (μ = 0 is plain linear attention, ``linear``; the released scripts sweep
            0.1 ... 0.9). Default 0.6.
        stepsize: step γ > 0 (default 1, the released code's).
        weights: ``'recurrence'`` (default: the paper's recurrence, key j weighs ``w(i - j)`` at query i) or
            ``'final'`` (the released parallel code: ``w(N - 1 - j)`` at every query).
        chunk_size: chunk length of the causal computation (default 64).
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask``: [B, N] bool key padding (True = real token).
    """

    supports_key_padding = True
    supports_causal = True
    eps: float = 1e-6
    __constants__ = TokenMixer.__constants__ + ['eps']

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
            mu: float = 0.6,
            stepsize: float = 1.,
            weights: str = 'recurrence',
            chunk_size: int = 64,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        self.mu = check_float('mu', mu, 0., 1., low_open=True, high_open=True)
        self.stepsize = check_float('stepsize', stepsize, 0., low_open=True)
        if weights not in ('recurrence', 'final'):
            raise ValueError(f"weights must be 'recurrence' or 'final', got {weights!r}")
        self.weights = weights
        self.chunk_size = check_int('chunk_size', chunk_size)

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        fq = F.elu(upcast(q)) + 1
        fk = _zero_padding(F.elu(upcast(k)) + 1, key_padding_mask)
        vf = v.to(fq.dtype)
        if is_causal and self.weights == 'recurrence':
            out = causal_momentum_attention(fq, fk, vf, self.mu, self.stepsize, self.eps, self.chunk_size)
        else:  # every key weighs γ w(N - 1 - j)
            w = momentum_weights(q.shape[2], self.mu, fq.device, fq.dtype).flip(0)
            out = _linear(fq, fk, vf * (self.stepsize * w)[:, None], causal=is_causal, eps=self.eps)
        return self.attn_drop(out.to(v.dtype))
