"""Collaborative multi-head attention: heads share one query/key projection and differ by a mixing vector.

Paper: "Multi-Head Attention: Collaborate Instead of Concatenate", Jean-Baptiste Cordonnier, Andreas Loukas, Martin
Jaggi, arXiv 2020, arXiv:2006.16362 (https://arxiv.org/abs/2006.16362). Code:
https://github.com/epfml/collaborative-attention (``src/collaborative_attention/collaborative_attention.py``).

Concatenated heads learn redundant key/query projections. Collaborative heads share ``W̃_Q, W̃_K`` of total width
D̃_k (``key_dim``) and give each head h a mixing vector m_h of that width (the rows of ``mixing`` [H, D̃_k]):

    q̃ = x W̃_Q,  k̃ = x W̃_K,
    logits_h[i, j] = ((q̃_i ⊙ m_h) · k̃_j + x_j · w_h) / sqrt(D̃_k / H),
    out_h = softmax_j(logits_h) v_h,    v = x W_V split into heads as usual, then ``proj``.

The term ``x_j · w_h`` is the paper's content bias (``content_bias``, a bias-free ``Linear(dim, H)``): with biased
projections, ``(x_i W_Q + b_Q)(x_j W_K + b_K)ᵀ`` expands into terms constant along j, which the softmax cancels, and
``b_Q W_Kᵀ x_jᵀ``, which it does not; sharing W̃_K, that term becomes one learned vector per head. A mixing matrix
that is one on head h's block of D columns (``mixing_init='concatenate'``) with ``key_dim=dim`` is exactly
standard multi-head attention: with the query/key biases of ``qkv_bias``, or without them and the content bias
``w_h = W_K^hᵀ b_Q^h``, which is how a pretrained layer is re-parametrised (the paper then decomposes the
``W_Q^h W_K^hᵀ`` jointly to shrink D̃_k). Each head's logits take D̃_k products per pair (the masked query
``q̃ ⊙ m_h`` has the full shared width), so with D̃_k = dim the logits cost H times those of concatenated heads;
the parameters (and, for a small D̃_k, the cost) are what collaboration saves.

Layout: one fused ``qkv = Linear(dim, 2·D̃_k + dim)`` (queries, keys, values); with the default ``key_dim=dim`` it
has the shape of timm's ``qkv``. The paper's NMT experiments train from scratch with D̃_k down to a quarter of
the model width at no loss ("reduce the key dimension by 4×"); its re-parametrisation experiments start from
D̃_k = dim. Default ``key_dim=None``: dim (the lossless setting); pass e.g. ``key_dim=dim // 4`` for the compressed
one. With ``qkv_bias`` the query and key get biases as well as the value (the code has none on the query and key:
the content bias replaces them); ``qk_norm`` normalises the shared q̃ and k̃ over their D̃_k features.
Initialisation of the mixing: ``'normal'`` (default, the released package's ``N(0, 0.2²)``), ``'xavier'`` (the
released NMT code) or ``'concatenate'`` (starts as standard multi-head attention).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_int
from ..registry import register
from ._base import TokenMixer, softmax_attention

__all__ = ['CollaborativeAttention']

MIXING_INITS = ('normal', 'xavier', 'concatenate')


@register(
    'collaborative', paper='Multi-Head Attention: Collaborate Instead of Concatenate', arxiv='2006.16362',
    year=2020, family='softmax', complexity='O(N²·(H·D_k + C))', kind='mixer', supports_causal=True,
)
class CollaborativeAttention(TokenMixer):
    """Softmax attention with a shared query/key projection and one mixing vector per head.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`).
        key_dim: D̃_k, the width of the shared query/key projection (default None: dim); need not divide by H.
        content_bias: add the per-head content bias ``x_j · w_h`` to the logits (the paper's, default True).
        mixing_init: ``'normal'``, ``'xavier'`` or ``'concatenate'`` (see the module docstring).
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask`` [B, N] bool (True = real token) or broadcastable to
        [B, H, N, N] (SDPA's convention).
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
            key_dim: int | None = None,
            content_bias: bool = True,
            mixing_init: str = 'normal',
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            use_qkv=False, device=device, dtype=dtype)
        dd = dict(device=device, dtype=dtype)
        key_dim = dim if key_dim is None else check_int('key_dim', key_dim)
        if mixing_init not in MIXING_INITS:
            raise ValueError(f'mixing_init must be one of {MIXING_INITS}, got {mixing_init!r}')
        self.key_dim = key_dim
        self.mixing_init = mixing_init
        self.scale = (key_dim / num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 2 * key_dim + dim, bias=qkv_bias, **dd)
        if qk_norm:
            self.q_norm = norm_layer(key_dim, **dd)
            self.k_norm = norm_layer(key_dim, **dd)
        self.mixing = nn.Parameter(torch.empty(num_heads, key_dim, **dd))
        self.content_bias = nn.Linear(dim, num_heads, bias=False, **dd) if content_bias else None
        self.reset_mixing()

    def reset_mixing(self) -> None:
        """Initialise ``mixing`` [H, D̃_k] by ``mixing_init``."""
        with torch.no_grad():
            if self.mixing_init == 'normal':
                nn.init.normal_(self.mixing, std=0.2)
            elif self.mixing_init == 'xavier':
                nn.init.xavier_uniform_(self.mixing)
            else:  # head h: ones on its block of ceil(D̃_k / H) columns (the last block may be shorter)
                self.mixing.zero_()
                width = math.ceil(self.key_dim / self.num_heads)
                for h in range(self.num_heads):
                    self.mixing[h, h * width:(h + 1) * width] = 1.

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        kpm, dense = self.check_input(x, attn_mask, is_causal)
        B, N, _ = x.shape
        H, Dk = self.num_heads, self.key_dim
        q, k, v = self.qkv(x).split([Dk, Dk, self.dim], dim=-1)
        q = self.q_norm(q).unsqueeze(1) * self.mixing[:, None, :].to(q.dtype)  # [B, H, N, Dk]
        k = self.k_norm(k).unsqueeze(1).expand(B, H, N, Dk)
        v = v.reshape(B, N, H, self.head_dim).transpose(1, 2)  # [B, H, N, D]
        mask = dense
        if self.content_bias is not None:
            bias = (self.content_bias(x) * self.scale).transpose(1, 2).unsqueeze(2)  # [B, H, 1, N]
            if dense is None:
                mask = bias
            elif dense.dtype == torch.bool:
                mask = torch.where(dense, bias, float('-inf'))
            else:
                mask = bias + dense.to(bias.dtype)
        p = self.attn_drop.p if self.training else 0.
        return self.merge_heads(softmax_attention(q, k, v, kpm, mask, is_causal, dropout_p=p, scale=self.scale))
