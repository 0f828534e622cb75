"""Synthesizer: attention weights synthesised without token-token dot products.

Paper: "Synthesizer: Rethinking Self-Attention in Transformer Models", Tay, Bahri, Metzler, Juan, Zhao, Zheng,
ICML 2021, arXiv:2005.00743.

``Y = softmax(B) G(X)`` with ``G`` the value projection and the [N, N] logits ``B`` (per head) made by:

- ``dense``: from each token alone, ``B_i = W2 σ_R(W1 X_i + b1) + b2`` mapping d -> l (``seq_len``);
- ``random``: a learned (or, ``trainable=False``, fixed) random matrix ``R`` [l, l], the same for every input;
- ``factorized_dense``: ``A = F_A(X_i)`` in R^a and ``B = F_B(X_i)`` in R^b with a·b = l (here a·b >= l and
  the first l are used), combined as ``H_A(A) * H_B(B)`` (A tiled b times, each entry of B repeated a times);
- ``factorized_random``: ``R = R1 R2ᵀ`` with R1, R2 of shape [l, k];
- ``vanilla``: the dot product ``q kᵀ / √D`` (for mixtures).

``synthesizer_mixture`` mixes components by learned weights, ``softmax(Σ α_i B_i)`` with ``α = softmax(a)``;
its default is the paper's Random + Vanilla. An input shorter than ``seq_len`` uses the top-left block of the
[l, l] logits; a longer one raises ``ValueError``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_int
from ..registry import register
from ._base import TokenMixer, check_length, check_seq_len, masked_softmax

__all__ = [
    'DenseLogits', 'FactorizedDenseLogits', 'FactorizedRandomLogits', 'RandomLogits', 'Synthesizer',
    'SynthesizerDense', 'SynthesizerFactorizedDense', 'SynthesizerFactorizedRandom', 'SynthesizerMixture',
    'SynthesizerRandom',
]

COMPONENTS = ('dense', 'random', 'factorized_dense', 'factorized_random', 'vanilla')


class DenseLogits(nn.Module):
    """``B_i = W2 relu(W1 x_i + b1) + b2``: [B, N, C] -> logits [B, H, N, l]."""

    def __init__(self, dim: int, num_heads: int, seq_len: int, *, device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.num_heads, self.seq_len = num_heads, seq_len
        self.fc1 = nn.Linear(dim, dim, **dd)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(dim, num_heads * seq_len, **dd)

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        return self.fc2(self.act(self.fc1(x))).reshape(B, N, self.num_heads, self.seq_len).transpose(1, 2)


class FactorizedDenseLogits(nn.Module):
    """``H_A(F_A(x_i)) * H_B(F_B(x_i))`` with ``F_A`` -> R^a, ``F_B`` -> R^b, ``b = ceil(l / a)``: logits
    [B, H, N, a·b] (a·b >= l; the first N are used, so a prime l needs no special case).

    ``F_A`` and ``F_B`` share the hidden layer ``W1`` of the dense synthesizer and have one output layer each.
    """

    def __init__(self, dim: int, num_heads: int, seq_len: int, factor: int, *, device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        check_int('factor', factor, 1, seq_len)
        self.num_heads, self.a, self.b = num_heads, factor, math.ceil(seq_len / factor)
        self.fc1 = nn.Linear(dim, dim, **dd)
        self.act = nn.ReLU()
        self.fc_a = nn.Linear(dim, num_heads * self.a, **dd)
        self.fc_b = nn.Linear(dim, num_heads * self.b, **dd)

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        h = self.act(self.fc1(x))
        a = self.fc_a(h).reshape(B, N, self.num_heads, self.a).transpose(1, 2)  # [B, H, N, a]
        b = self.fc_b(h).reshape(B, N, self.num_heads, self.b).transpose(1, 2)  # [B, H, N, b]
        return a.repeat(1, 1, 1, self.b) * b.repeat_interleave(self.a, dim=-1)  # entry j·a + i: a_i · b_j


def _random_tensor(
        module: nn.Module, name: str, shape: tuple[int, ...], trainable: bool, std: float, device=None, dtype=None,
) -> None:
    """Give ``module`` a normal(0, std) tensor ``name``: a parameter if ``trainable``, else a buffer."""
    t = torch.empty(shape, device=device, dtype=dtype)
    if t.device.type != 'meta':
        nn.init.normal_(t, std=std)
    if trainable:
        module.register_parameter(name, nn.Parameter(t))
    else:
        module.register_buffer(name, t)


class RandomLogits(nn.Module):
    """A random [H, l, l] logit matrix, learned (``trainable=True``) or fixed; ``std`` of its init."""

    def __init__(
            self, num_heads: int, seq_len: int, trainable: bool = True, std: float = 0.02, *, device=None, dtype=None,
    ) -> None:
        super().__init__()
        _random_tensor(self, 'weight', (num_heads, seq_len, seq_len), trainable, std, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.weight[None]


class FactorizedRandomLogits(nn.Module):
    """``R1 R2ᵀ`` with R1, R2 [H, l, k] (learned or fixed): logits [1, H, l, l]."""

    def __init__(
            self, num_heads: int, seq_len: int, rank: int, trainable: bool = True, std: float = 0.02, *, device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        check_int('rank', rank)
        for name in ('r1', 'r2'):
            _random_tensor(self, name, (num_heads, seq_len, rank), trainable, std ** 0.5, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return (self.r1 @ self.r2.transpose(-2, -1))[None]


class Synthesizer(TokenMixer):
    """Synthesizer attention ``softmax(Σ_i α_i B_i(X)) G(X)`` over ``components``.

    Args:
        dim, num_heads, ...: as `TokenMixer`. The ``qkv`` projection exists only with the ``'vanilla'``
            component; otherwise the values come from ``v`` (a ``Linear(dim, dim)``, bias ``qkv_bias``).
        seq_len: l, the longest input (required).
        components: names among ``'dense'``, ``'random'``, ``'factorized_dense'``, ``'factorized_random'``,
            ``'vanilla'`` (default: the registered variant's).
        trainable: learn the random matrices (False: the paper's fixed random variant).
        factor: a, for ``factorized_dense`` (default ``ceil(√l)``; b = ``ceil(l / a)``).
        rank: k, for ``factorized_random`` (default 8).

    Shapes:
        x: [B, N, C] -> [B, N, C] with N <= seq_len; ``attn_mask`` [B, N] bool or broadcastable to
        [B, H, N, N] (added to the synthesised logits); ``is_causal`` hides the keys after each query.
    """

    supports_key_padding = True
    supports_dense_mask = True
    supports_causal = True
    default_components: ClassVar[tuple[str, ...]] = ('dense',)

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
            seq_len: int | None = None,
            components: tuple[str, ...] | None = None,
            trainable: bool = True,
            factor: int | None = None,
            rank: int = 8,
            device=None,
            dtype=None,
    ) -> None:
        components = tuple(self.default_components if components is None else components)
        if not components or any(c not in COMPONENTS for c in components) or len(set(components)) != len(components):
            raise ValueError(f'components must be distinct names among {COMPONENTS}, got {components!r}')
        vanilla = 'vanilla' in components
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            use_qkv=vanilla, device=device, dtype=dtype)
        dd = dict(device=device, dtype=dtype)
        self.seq_len = check_seq_len(seq_len)
        self.components = components
        self.vanilla_index = components.index('vanilla') if vanilla else -1  # its place in the mixture
        # checked whatever the components, so that a wrong value never waits for a variant that uses it
        factor = math.ceil(math.sqrt(self.seq_len)) if factor is None else check_int('factor', factor, 1, self.seq_len)
        check_int('rank', rank)
        makers = {
            'dense': lambda: DenseLogits(dim, num_heads, seq_len, **dd),
            'random': lambda: RandomLogits(num_heads, seq_len, trainable, **dd),
            'factorized_dense': lambda: FactorizedDenseLogits(dim, num_heads, seq_len, factor, **dd),
            'factorized_random': lambda: FactorizedRandomLogits(num_heads, seq_len, rank, trainable, **dd),
        }
        self.synth = nn.ModuleDict({c: makers[c]() for c in components if c != 'vanilla'})
        self.v = None if vanilla else nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.mix_logits = nn.Parameter(torch.zeros(len(components), **dd)) if len(components) > 1 else None

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        kpm, dense = self.check_input(x, attn_mask, is_causal)
        B, N, _ = x.shape
        check_length(self.mixer_name, N, self.seq_len)
        parts: list[Tensor] = []  # the logits of each component, in the order of ``components``
        for synth in self.synth.values():
            parts.append(synth(x)[..., :N, :N])
        if self.v is None:
            q, k, v = self.split_heads(x)
            parts.insert(self.vanilla_index, (q * self.scale) @ k.transpose(-2, -1))
        else:
            v = self.v(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, N, D]
        logits = parts[0]
        if self.mix_logits is not None:
            weights = self.mix_logits.softmax(0)
            logits = weights[0] * logits
            for i in range(1, len(parts)):
                logits = logits + weights[i] * parts[i]
        attn = self.attn_drop(masked_softmax(logits, kpm, dense, is_causal))
        return self.merge_heads(attn.to(v.dtype) @ v)


_PAPER = dict(
    paper='Synthesizer: Rethinking Self-Attention in Transformer Models', arxiv='2005.00743', year=2020,
    family='synthetic', kind='mixer', supports_causal=True, requires_seq_len=True,
)


@register('synthesizer_dense', complexity='O(N²·C)', **_PAPER)
class SynthesizerDense(Synthesizer):
    """Dense Synthesizer: logits ``W2 relu(W1 x_i)`` per token (see `Synthesizer`)."""

    default_components = ('dense',)


@register('synthesizer_random', complexity='O(N²·C)', **_PAPER)
class SynthesizerRandom(Synthesizer):
    """Random Synthesizer: one learned (or fixed) [l, l] logit matrix per head (see `Synthesizer`)."""

    default_components = ('random',)


@register('synthesizer_factorized_dense', complexity='O(N²·C)', **_PAPER)
class SynthesizerFactorizedDense(Synthesizer):
    """Factorized Dense Synthesizer: logits ``H_A(A) * H_B(B)`` with a·b = l (see `Synthesizer`)."""

    default_components = ('factorized_dense',)


@register('synthesizer_factorized_random', complexity='O(N²·C)', **_PAPER)
class SynthesizerFactorizedRandom(Synthesizer):
    """Factorized Random Synthesizer: logits ``R1 R2ᵀ`` of rank k (see `Synthesizer`)."""

    default_components = ('factorized_random',)


@register('synthesizer_mixture', complexity='O(N²·C)', **_PAPER)
class SynthesizerMixture(Synthesizer):
    """Mixture Synthesizer: learned mix of components, by default the paper's Random + Vanilla (see `Synthesizer`)."""

    default_components = ('random', 'vanilla')
