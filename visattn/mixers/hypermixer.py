"""HyperMixer: a token-mixing MLP whose weights hypernetworks generate from the tokens.

Paper: "HyperMixer: An MLP-based Low Cost Alternative to Transformers", Mai, Pannatier, Fehr, Chen, Marelli,
Fleuret, Henderson, ACL 2023, arXiv:2203.03691 (https://arxiv.org/abs/2203.03691). Released code:
https://github.com/idiap/hypermixing (``HyperMixing``, single- and multi-head).

MLP-Mixer's token MLP needs a fixed N; HyperMixer generates its two weight matrices from the tokens themselves,
one row per token, so any N works and the layer is equivariant to permutations up to the position information:

    W1 = [h1(x_n + p_n)]_n ∈ R^{N×d'},   W2 = [h2(x_n + p_n)]_n ∈ R^{N×d'},   TM-MLP(X) = W2 σ(W1ᵀ X) ∈ R^{N×C},

h1, h2 two-layer MLPs ``C -> C -> d'`` with GELU, p_n the sinusoidal position embedding of token n, σ = GELU. With
``num_heads`` H > 1 (the released code's multi-head HyperMixing) the channels split into H groups of C/H, each with
its own hypernetworks ``C/H -> C/H -> d'/H`` and its own token MLP; H = 1 is the paper's. The released code's
defaults are taken where the paper leaves a choice: the hypernetworks have no biases (``hyper_bias``), h1 and h2
are separate (``tied=True`` shares them, the paper's tied variant) and the output goes through a LayerNorm
(``out_norm``; the code's ``use_layer_norm=True``). Differences from the released code: the position embedding is
the standard sinusoid ``sin/cos(n / 10000^(2i/C))`` from position 0 (the code starts at 1 and its frequencies
decay twice as fast), added to ``x`` as the paper writes (the code adds it to ``x·√C``: ``scale_input=True``).

Masks: a key-padding mask is exact, as in the released code: hidden tokens generate no weights (their rows of W1
and W2 are zero, so they neither send nor receive) and their values are zeroed; a hidden token's output is the
output norm of zero. ``is_causal`` is refused: ``σ(W1ᵀ X)`` sums over every token before the nonlinearity, and a
causal form would need one d'×C hidden state per position. O(N·C·(C + d')/H).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_int
from ..registry import register
from ._base import TokenMixer
from .mlp_mixer import hide_padded

__all__ = ['HyperMixer', 'HeadwiseMLP', 'sinusoid_positions']


def sinusoid_positions(n: int, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The sinusoidal position embedding [n, dim]: ``p[t, 2i] = sin(t ω_i)``, ``p[t, 2i + 1] = cos(t ω_i)``,
    ``ω_i = 10000^(-2i / dim)``, positions t = 0 .. n - 1."""
    t = torch.arange(n, device=device, dtype=dtype)[:, None]
    omega = torch.exp(torch.arange(0, dim, 2, device=device, dtype=dtype) * (-math.log(10000.) / dim))
    angles = t * omega  # [n, ceil(dim / 2)]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)[:, :dim]


class HeadwiseMLP(nn.Module):
    """H independent two-layer MLPs ``in -> hidden -> out`` (GELU), one per channel group of the input.

    Args:
        heads: H.
        in_features, hidden_features, out_features: per head.
        bias: biases in both layers.
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, H · in] -> [B, H, N, out], computed in the dtype of ``x`` (the weights are cast to it).
    """

    def __init__(self, heads: int, in_features: int, hidden_features: int, out_features: int, bias: bool = False,
                 *, device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.heads = heads
        self.fc1_weight = nn.Parameter(torch.empty(heads, hidden_features, in_features, **dd))
        self.fc2_weight = nn.Parameter(torch.empty(heads, out_features, hidden_features, **dd))
        self.fc1_bias = nn.Parameter(torch.empty(heads, hidden_features, **dd)) if bias else None
        self.fc2_bias = nn.Parameter(torch.empty(heads, out_features, **dd)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each head's matrix Xavier-uniform with gain √2, biases 0 (the released code uses Xavier for both)."""
        if self.fc1_weight.device.type == 'meta':
            return
        for w in (self.fc1_weight, self.fc2_weight):
            for h in range(self.heads):
                nn.init.xavier_uniform_(w[h], gain=math.sqrt(2.))
        for b in (self.fc1_bias, self.fc2_bias):
            if b is not None:
                nn.init.zeros_(b)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        x = x.reshape(B, N, self.heads, C // self.heads)
        h = torch.einsum('bnhi,hoi->bhno', x, self.fc1_weight.to(x.dtype))
        b1 = self.fc1_bias
        if b1 is not None:
            h = h + b1.to(x.dtype)[None, :, None]
        out = torch.einsum('bhni,hoi->bhno', F.gelu(h), self.fc2_weight.to(x.dtype))
        b2 = self.fc2_bias
        if b2 is not None:
            out = out + b2.to(x.dtype)[None, :, None]
        return out


@register(
    'hypermixer', paper='HyperMixer: An MLP-based Low Cost Alternative to Transformers', arxiv='2203.03691',
    year=2023, family='mlp', complexity='O(N·C·(C + d′)/H)', kind='mixer',
)
class HyperMixer(TokenMixer):
    """HyperMixing: ``W2 σ(W1ᵀ X)`` with W1, W2 generated per token by hypernetworks, per head.

    Args:
        dim, num_heads, ...: timm ``Attention``'s constructor; ``num_heads`` is H, the number of parallel token MLPs
            (1: the paper's HyperMixer). No ``qkv`` and no ``proj``; ``attn_drop`` is the dropout on ``σ(W1ᵀ X)``,
            ``proj_drop`` the dropout at the end.
        hidden_features: d', the hidden width of the token MLP over all heads, divisible by H (default 4·C, the
            ratio of the released code's example).
        tied: one hypernetwork for W1 and W2 (W2 = W1).
        hyper_bias: biases in the hypernetworks (default False, the released code's).
        out_norm: a LayerNorm (eps 1e-5) on the output (default True, the released code's).
        scale_input: feed ``x·√C + p`` to the hypernetworks, as the released code, instead of the paper's ``x + p``.
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C], any N; ``attn_mask``: [B, N] bool key padding (True = real token).
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
            hidden_features: int | None = None,
            tied: bool = False,
            hyper_bias: bool = False,
            out_norm: bool = True,
            scale_input: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            use_qkv=False, use_proj=False, device=device, dtype=dtype)
        dd = dict(device=device, dtype=dtype)
        hidden_features = 4 * dim if hidden_features is None else check_int('hidden_features', hidden_features)
        if hidden_features % num_heads:
            raise ValueError(
                f'hidden_features={hidden_features} must be divisible by num_heads={num_heads} (d\'/H per head)')
        self.hidden_features = hidden_features
        self.input_scale = math.sqrt(dim) if scale_input else 1.
        d, e = self.head_dim, hidden_features // num_heads
        self.hyper_w1 = HeadwiseMLP(num_heads, d, d, e, hyper_bias, **dd)
        self.hyper_w2 = None if tied else HeadwiseMLP(num_heads, d, d, e, hyper_bias, **dd)
        self.out_norm = nn.LayerNorm(dim, **dd) if out_norm else nn.Identity()

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        kpm, _ = self.check_input(x, attn_mask, is_causal)
        B, N, C = x.shape
        dtype = x.dtype
        values = hide_padded(x, kpm)  # [B, N, C], float32 or wider
        hyper_in = values * self.input_scale + sinusoid_positions(N, C, values.device, values.dtype)
        w1 = self.hyper_w1(hyper_in)  # [B, H, N, d'/H]
        w2 = w1
        if self.hyper_w2 is not None:
            w2 = self.hyper_w2(hyper_in)
        if kpm is not None:
            hidden = ~kpm[:, None, :, None]
            w1, w2 = w1.masked_fill(hidden, 0.), w2.masked_fill(hidden, 0.)
        v = values.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, N, C/H]
        mixed = self.attn_drop(F.gelu(w1.transpose(-2, -1) @ v))  # [B, H, d'/H, C/H]
        out = (w2 @ mixed).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.out_norm(out.to(dtype)))
