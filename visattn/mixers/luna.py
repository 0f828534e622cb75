"""Luna: linear unified nested attention, as an N -> N token mixer (pack into p slots, unpack back to N).

Paper: "Luna: Linear Unified Nested Attention", Ma, Kong, Wang, Zhou, May, Ma, Zettlemoyer, NeurIPS 2021,
arXiv:2106.01540 (https://arxiv.org/abs/2106.01540); released code: XuezheMax/fairseq-apollo
(``fairseq/modules/luna_attention.py``).

With an extra sequence P [p, C] (p fixed, independent of N), two nested multi-head attentions:

    pack:    P' = Attn(P, X) = Concat_h(softmax(P Wᴾᵠ_h (X Wᴾᴷ_h)ᵀ / √d) X Wᴾⱽ_h)      [p, C]
    unpack:  Y  = Attn(X, P') = Concat_h(softmax(X Wᵠ_h (P' Wᴷ_h)ᵀ / √d) P' Wⱽ_h) Wᴼ   [N, C]

O(N·p·C) time and memory. ``qkv`` and ``proj`` are the unpack's Wᵠ, Wᴷ, Wⱽ (on the tokens and on P') and Wᴼ, as
timm's ``Attention``; ``pq`` is Wᴾᵠ (the code's ``pq_proj``) and ``pkv`` holds Wᴾᴷ, Wᴾⱽ (the code's untied
``pk_proj`` / ``pv_proj``). The pack has ``pack_heads`` heads (the code's ``num_pheads``, default ``num_heads``) and
no output projection, as the code. In the paper P is carried from layer to layer (the next layer's P is
``LayerNorm(P' + P)``) and only the first layer's P is learned; a token-mixer slot passes nothing between layers,
so each mixer has its own learned ``pquery`` = P, drawn N(0, C^-1) as the code's ``projected_embeddings``.
The code's default ``tie_kv=True`` (one projection for both the keys and the values of each attention, its
``luna.base.tied`` models) is not offered: it would break the ``qkv`` layout that timm's weights load into.

Key padding: hidden tokens are excluded from packing (the pack softmax runs over the visible tokens only), so
they reach no slot and no output; a sequence with no visible token packs to P' = 0. The unpack attends to all p
slots, never an empty row.

Causal (``is_causal=True``), the released ``LunarCausalAttention``'s construction: the pack of position t may read
x_1..x_t only, so the softmax over the tokens is replaced by the positive weights ``φ = elu + 1`` averaged over
the prefix, and every position unpacks its own packed context:

    φ_jl = elu(P Wᴾᵠ_l · x_j Wᴾᴷ / √d) + 1,        P'_t[l] = (1/|V_t|) Σ_{j ∈ V_t} φ_jl x_j Wᴾⱽ
    y_t = Concat_h(softmax(x_t Wᵠ_h (P'_t Wᴷ_h)ᵀ / √d) P'_t Wⱽ_h) Wᴼ

with V_t the visible tokens j <= t (the code divides by t; here hidden tokens neither pack nor count). This keeps
the non-causal form's projections; the released causal module instead folds the unpack's key and value
projections into the pack (its packed values are ``k_proj(x_j)``, ``v_proj(x_j)`` per head and it has no Wᴾⱽ),
not offered. The causal path keeps a packed context per position: O(N·p·C) memory and O(N·p·C²) time.
``attn_drop`` drops the pack weights and the unpack weights (both, as the code).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_int
from ..registry import register
from ._base import TokenMixer
from ._sparse_utils import attention_lse
from .isab import cross_qkv

__all__ = ['LunaAttention']


@register(
    'luna', paper='Luna: Linear Unified Nested Attention', arxiv='2106.01540', year=2021, family='memory',
    complexity='O(N·p·C)', kind='mixer', supports_causal=True,
)
class LunaAttention(TokenMixer):
    """Luna pack-and-unpack attention with one learned packed sequence P of length p.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`); ``qkv_bias`` is also the bias of ``pq`` and ``pkv``; ``qk_norm``
            normalises the unpack's queries and keys.
        pack_len: p, the length of the packed sequence (default 16, the paper's shortest; the code's
            ``projection_length``).
        pack_heads: heads of the pack attention (default ``num_heads``; must divide ``dim``).
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask``: [B, N] bool key padding (True = real token).

    Parameters beyond timm's ``Attention``: ``pquery`` [p, C] (P), ``pq`` [C, C], ``pkv`` [2C, C].
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
            pack_len: int = 16,
            pack_heads: int | None = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        dd = dict(device=device, dtype=dtype)
        self.pack_len = check_int('pack_len', pack_len)
        self.pack_heads = num_heads if pack_heads is None else check_int('pack_heads', pack_heads)
        if dim % self.pack_heads:
            raise ValueError(f'pack_heads={pack_heads} must divide dim={dim}')
        self.pack_head_dim = dim // self.pack_heads
        self.pack_scale = self.pack_head_dim ** -0.5
        self.pquery = nn.Parameter(torch.empty(pack_len, dim, **dd))
        self.pq = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.pkv = nn.Linear(dim, 2 * dim, bias=qkv_bias, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """P ~ N(0, 1/C), as the released code's ``projected_embeddings``."""
        if self.pquery.device.type != 'meta':
            nn.init.normal_(self.pquery, std=self.dim ** -0.5)

    def pack_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The pack's queries ``[1, pH, p, pd]`` (P Wᴾᵠ) and keys and values ``[B, pH, N, pd]`` of ``x`` [B, N, C]."""
        B, N, _ = x.shape
        pq = self.pq(self.pquery.to(x.dtype)).reshape(1, self.pack_len, self.pack_heads, self.pack_head_dim)
        pk, pv = self.pkv(x).reshape(B, N, 2, self.pack_heads, self.pack_head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return pq.transpose(1, 2), pk, pv

    def pack(self, x: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        """P' = Attn(P, X) over the visible tokens: [B, N, C] -> [B, p, C]."""
        pq, pk, pv = self.pack_inputs(x)
        B = x.shape[0]
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        dropout_p = self.attn_drop.p if self.training else 0.
        packed, _ = attention_lse(pq.expand(B, -1, -1, -1), pk, pv, mask, scale=self.pack_scale, dropout_p=dropout_p)
        return packed.transpose(1, 2).reshape(B, self.pack_len, self.dim)

    def causal_pack(self, x: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        """P'_t of every position t (elu + 1 weights averaged over the visible prefix): [B, N, C] -> [B, N, p, C]."""
        pq, pk, pv = self.pack_inputs(x)
        B, N, _ = x.shape
        ct = torch.promote_types(x.dtype, torch.float32)
        phi = F.elu(torch.matmul(pk.to(ct), pq.to(ct).transpose(-1, -2)) * self.pack_scale) + 1.  # [B, pH, N, p]
        if key_padding_mask is None:
            count = torch.arange(1, N + 1, device=x.device, dtype=ct)[None, :].expand(B, N)
        else:
            phi = phi.masked_fill(~key_padding_mask[:, None, :, None], 0.)
            count = key_padding_mask.to(ct).cumsum(1).clamp_min(1.)
        phi = self.attn_drop(phi)
        pv = pv.to(ct)
        if key_padding_mask is not None:
            pv = pv.masked_fill(~key_padding_mask[:, None, :, None], 0.)
        packed = torch.cumsum(phi.unsqueeze(-1) * pv.unsqueeze(-2), dim=2)  # [B, pH, N, p, pd]
        packed = packed / count[:, None, :, None, None]
        return packed.permute(0, 2, 3, 1, 4).reshape(B, N, self.pack_len, self.dim).to(x.dtype)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        kpm, _ = self.check_input(x, attn_mask, is_causal)
        qkv = self.qkv
        assert qkv is not None  # built (use_qkv=True); refines Optional for TorchScript
        dropout_p = self.attn_drop.p if self.training else 0.
        if not is_causal:
            q, k, v = cross_qkv(qkv.weight, qkv.bias, x, self.pack(x, kpm), self.num_heads)
            out, _ = attention_lse(self.q_norm(q), self.k_norm(k), v, None, scale=self.scale, dropout_p=dropout_p)
            return self.merge_heads(out)
        B, N, C = x.shape
        packed = self.causal_pack(x, kpm)  # [B, N, p, C]
        q, k, v = cross_qkv(qkv.weight, qkv.bias, x, packed.reshape(B, N * self.pack_len, C), self.num_heads)
        k = k.reshape(B, self.num_heads, N, self.pack_len, self.head_dim)  # [B, H, N, p, D]
        v = v.reshape(B, self.num_heads, N, self.pack_len, self.head_dim)
        q = self.q_norm(q).unsqueeze(-2)  # [B, H, N, 1, D]: query t against its own packed context
        out, _ = attention_lse(q, self.k_norm(k), v, None, scale=self.scale, dropout_p=dropout_p)
        return self.merge_heads(out.squeeze(-2))
