"""Flow-Attention: linear attention with flow conservation (Flowformer).

Paper: "Flowformer: Linearizing Transformers with Conservation Flows", Wu, Wu, Xu, Wang, Long, ICML 2022,
arXiv:2202.06258 (https://arxiv.org/abs/2202.06258). Official code: https://github.com/thuml/Flowformer.

Queries are sinks and keys are sources of a flow network, ``φ = sigmoid`` (non-negative). With
``φ(Q) = [φ(q_i)]`` and ``φ(K) = [φ(k_j)]``:

- incoming and outgoing flows ``I_i = φ(q_i)·Σ_j φ(k_j)``, ``O_j = φ(k_j)·Σ_i φ(q_i)``;
- conserved flows ``Î_i = φ(q_i)·Σ_j φ(k_j) / O_j`` and ``Ô_j = φ(k_j)·Σ_i φ(q_i) / I_i``;
- competition ``V̂ = softmax_j(Ô) · N ⊙ V`` (the sources compete for a fixed outgoing flow; × N as the released
  code, so that the values keep their scale);
- aggregation ``A_i = φ(q_i)ᵀ Σ_j φ(k_j) v̂_jᵀ / I_i`` (`visattn.ops.linear_attention`);
- allocation ``R_i = sigmoid(Î_i) ⊙ A_i``.

Causal (the paper's autoregressive form, as the released ``Flow_Attention_Causal``): every sum over the sequence
becomes a prefix sum over ``j <= i`` and the conserved flows are normalised by the position count ``n_i`` (the
number of tokens seen): ``Î_i = φ(q_i)·Σ_{j<=i} φ(k_j) n_j / O_j / n_i``, ``Ô_i = φ(k_i)·Σ_{j<=i} φ(q_j) n_j / I_j
/ n_i``, the competition is the causal softmax ``exp(Ô_i) / Σ_{j<=i} exp(Ô_j) · n_i`` and the aggregation is causal
linear attention. The non-causal form is the same formula with every prefix the whole sequence (``n_i = N``), so one
code path serves both.

Padding (``attn_mask`` [B, N], True = real token) is exact: padded tokens are neither sinks nor sources (their
features are zeroed), the competition softmax runs over the real keys and ``N`` (``n_i``) counts the real tokens.

Differences from the released code, with the paper's form the default:
    - the code adds ``eps = 1e-6`` to every feature inside each flow; here flows are exact, and only the
      aggregation keeps the op's ``eps`` in its normaliser;
    - the code clamps ``Ô`` to [-1, 1] (non-causal; [-5, 5] in its NLP code) "for stability"; ``source_clamp=1.``
      does the same, the default (None) does not clamp (``Ô`` averages 1 over the keys, so the exponent is tame,
      and the causal softmax is taken as a ``logcumsumexp``, stable without a clamp).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_float, float_min
from ..ops._dispatch import upcast
from ..registry import register
from ._base import TokenMixer
from .linear import _linear

__all__ = ['Flowformer', 'flow_attention']


def _flow_sum(x: Tensor, causal: bool) -> Tensor:
    """Σ over the tokens of ``x`` [B, H, N, ...]: the prefix sums (causal) or the total, kept as a length-1 dim."""
    return x.cumsum(2) if causal else x.sum(2, keepdim=True)


def _nonzero(x: Tensor) -> Tensor:
    """``x`` with its zeros replaced by ones (a divisor whose numerators are zero there)."""
    return torch.where(x > 0, x, torch.ones_like(x))


def flow_attention(
        q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None, causal: bool = False,
        source_clamp: float | None = None, eps: float = 1e-6,
) -> Tensor:
    """Flow-Attention on projected ``q``, ``k``, ``v`` [B, H, N, D] (before the feature map).

    Args:
        q, k: [B, H, N, D]; ``φ = sigmoid`` is applied here.
        v: [B, H, N, Dv].
        key_padding_mask: [B, N] bool, True = a real token (None: all real).
        causal: the paper's autoregressive form (prefix sums normalised by the position count).
        source_clamp: clamp the conserved outgoing flow to [-c, c] before the competition (released code: 1).
        eps: added to the aggregation's normaliser.

    Returns:
        [B, H, N, Dv] in ``v``'s dtype (computed in at least float32).
    """
    dtype = v.dtype
    fq, fk, vf = torch.sigmoid(upcast(q)), torch.sigmoid(upcast(k)), upcast(v)
    B, _, N, _ = fq.shape
    if key_padding_mask is None:
        real = fq.new_ones(B, 1, N, 1)
    else:
        real = key_padding_mask[:, None, :, None].to(fq.dtype)
        fq, fk, vf = fq * real, fk * real, vf * real
    count = _flow_sum(real, causal).clamp_min(1.)  # n_i: the real tokens seen, [B, 1, N or 1, 1]
    # flows, 1 where a token has none (a padded token, or features that all underflow): its terms are then zero
    incoming = _nonzero((fq * _flow_sum(fk, causal)).sum(-1, keepdim=True))  # I_i [B, H, N, 1]
    outgoing = _nonzero((fk * _flow_sum(fq, causal)).sum(-1, keepdim=True))  # O_j
    # φ(k_j) / O_j before the count: bounded elementwise by 1 / Σ φ(q), however small φ(k_j) is
    sink = (fq * _flow_sum(fk / outgoing * count, causal)).sum(-1) / count[..., 0]  # Î_i [B, H, N]
    source = (fk * _flow_sum(fq / incoming * count, causal)).sum(-1) / count[..., 0]  # Ô_j
    if source_clamp is not None:
        source = source.clamp(-source_clamp, source_clamp)
    if key_padding_mask is not None:
        source = source.masked_fill(~key_padding_mask[:, None, :], float_min(source.dtype))
    if causal:
        lse = torch.logcumsumexp(source, dim=-1)
    else:
        lse = torch.logsumexp(source, dim=-1, keepdim=True)
    competition = torch.exp(source - lse) * count[..., 0]  # softmax over the (real) sources, times n
    out = _linear(fq, fk, vf * competition[..., None], causal=causal, eps=eps)  # φ(q_i)ᵀ Σ φ(k_j) v̂_jᵀ / I_i
    return (out * torch.sigmoid(sink)[..., None]).to(dtype)


@register(
    'flowformer', paper='Flowformer: Linearizing Transformers with Conservation Flows', arxiv='2202.06258',
    year=2022, family='linear', complexity='O(N·C²/H)', kind='mixer', supports_causal=True,
)
class Flowformer(TokenMixer):
    """Flow-Attention (see the module docstring for the equations).

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`; ``attn_drop`` drops the mixed values, there are no weights).
        source_clamp: clamp the conserved outgoing flow to [-c, c] (None, the default: the paper's form; the
            released code uses 1).
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask``: [B, N] bool key padding (True = real token), exact.
    """

    supports_key_padding = True
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
            source_clamp: float | None = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        self.source_clamp = None if source_clamp is None else check_float(
            'source_clamp', source_clamp, 0., low_open=True)

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        return self.attn_drop(flow_attention(q, k, v, key_padding_mask, is_causal, self.source_clamp))
