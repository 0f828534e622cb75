"""Induced set attention block (ISAB) of the Set Transformer, as an N -> N token mixer.

Paper: "Set Transformer: A Framework for Attention-based Permutation-Invariant Neural Networks", Lee, Lee, Kim,
Kosiorek, Choi, Teh, ICML 2019, arXiv:1810.00825 (https://arxiv.org/abs/1810.00825).

The paper's blocks, for a set X [n, d] and m learned inducing points I [m, d]:

    Multihead(Q, K, V) = Concat_j(softmax(Q W_jᵠ (K W_jᴷ)ᵀ / √d_h) V W_jⱽ) Wᴼ
    MAB(X, Y) = LayerNorm(H + rFF(H)),   H = LayerNorm(X + Multihead(X, Y, Y))
    ISAB_m(X) = MAB(X, H),               H = MAB(I, X)   [m, d]

so the n tokens reach each other only through the m inducing points: O(n·m) instead of O(n²).

How the MABs map onto the token-mixer slot of a ViT block (``x + mixer(norm(x))``, then ``x + mlp(norm(x))``):

- the outer MAB(X, H): its attention is this mixer's second step, ``Multihead(X, H, H)`` through ``qkv`` (queries
  from the tokens, keys and values from H) and ``proj``; its residual, LayerNorm and rFF are the block's own
  (pre-norm there, post-norm in the paper).
- the inner MAB(I, X) has no block around it, so the mixer computes its attention with its residual on the
  inducing points, ``H = I + Multihead(I, X, X)``, through its own projections ``induce_q``, ``induce_kv`` and
  ``induce_proj`` (default: the paper's ISAB has two MABs with separate parameters, and the inducing points and
  the tokens live in different places, so one query map for both would tie them). ``shared_proj=True`` makes
  both steps use ``qkv`` and ``proj`` (fewer parameters; a pretrained ViT's attention then initialises both).
  ``induce_ffn=True`` adds the rest of MAB(I, X): ``H = LN(H' + rFF(H'))`` with ``H' = LN(I + Multihead)``,
  the rFF as the released code's ``H' + relu(fc(H'))``; off by default, as the released code's ``ln=False``
  and because the block's MLP follows.

Where the released code (juho-lee/set_transformer ``modules.py``) differs from the paper: its MAB adds the
*projected* queries as the residual (``Q W + A V``) and has no output projection Wᴼ (``fc_o`` is the rFF). The
paper's form is followed (with timm's ``proj`` as Wᴼ of the outer MAB); the code's variant is not offered. The
scores are scaled by ``1/√d_h`` of the head width (timm's; the code divides by √ of the full width). The
inducing points start as the code's Xavier-uniform of its ``[1, m, d]`` tensor.

Key padding: hidden tokens are excluded from the inner softmax, so they never reach I (nor H, nor any output);
a sequence with no visible token gives ``H = I`` (+ the bias of ``induce_proj``). Every token sees all of H, so
no row of the outer attention is ever empty. ``is_causal=True`` is refused: the inducing points summarise the
whole set, so every output depends on every token (the Set Transformer is a set model with no order).
``qk_norm`` normalises the queries and keys of both steps with the same per-head norms.
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

__all__ = ['InducedSetAttention', 'cross_qkv']


def cross_qkv(
        weight: Tensor, bias: Tensor | None, x: Tensor, source: Tensor, num_heads: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Queries of ``x`` and keys and values of ``source`` through a timm ``qkv`` Linear (``weight`` [3C, C]: its first
    C rows make q, the next k, the last v).

    Args:
        weight: [3C, C]; bias: [3C] or None.
        x: [B, N, C] (the queries' tokens); source: [B', M, C] (the keys' and values' tokens).
        num_heads: H.

    Returns:
        ``q`` [B, H, N, C/H]; ``k``, ``v`` [B', H, M, C/H].
    """
    C = x.shape[-1]
    q = F.linear(x, weight[:C], None if bias is None else bias[:C])
    kv = F.linear(source, weight[C:], None if bias is None else bias[C:])
    k, v = kv.reshape(source.shape[0], source.shape[1], 2, num_heads, C // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    return q.reshape(x.shape[0], x.shape[1], num_heads, C // num_heads).transpose(1, 2), k, v


@register(
    'isab', paper='Set Transformer: A Framework for Attention-based Permutation-Invariant Neural Networks',
    arxiv='1810.00825', year=2019, family='memory', complexity='O(N·m·C)', kind='mixer',
)
class InducedSetAttention(TokenMixer):
    """Induced set attention: m learned inducing points attend to the tokens, then the tokens attend to them.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`); ``qkv`` and ``proj`` are the outer MAB's projections.
        num_inducing: m, the inducing points (default 32, the released code's ``num_inds``).
        shared_proj: the inner attention uses ``qkv`` and ``proj`` too (default False: its own projections).
        induce_ffn: complete the inner MAB with its LayerNorms and rFF (default False).
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask``: [B, N] bool key padding (True = real token).

    Parameters beyond timm's ``Attention``: ``inducing`` [m, C]; unless ``shared_proj``: ``induce_q`` [C, C],
    ``induce_kv`` [2C, C], ``induce_proj`` [C, C]; with ``induce_ffn``: ``induce_norm0``, ``induce_fc``,
    ``induce_norm1``.
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
            num_inducing: int = 32,
            shared_proj: bool = False,
            induce_ffn: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        dd = dict(device=device, dtype=dtype)
        self.num_inducing = check_int('num_inducing', num_inducing)
        self.shared_proj = bool(shared_proj)
        self.induce_ffn = bool(induce_ffn)
        self.inducing = nn.Parameter(torch.empty(num_inducing, dim, **dd))
        self.induce_q = None if shared_proj else nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.induce_kv = None if shared_proj else nn.Linear(dim, 2 * dim, bias=qkv_bias, **dd)
        self.induce_proj = None if shared_proj else nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.induce_norm0 = nn.LayerNorm(dim, **dd) if induce_ffn else nn.Identity()
        self.induce_fc = nn.Linear(dim, dim, **dd) if induce_ffn else None
        self.induce_norm1 = nn.LayerNorm(dim, **dd) if induce_ffn else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The inducing points as the released code: Xavier-uniform of a [1, m, C] tensor."""
        if self.inducing.device.type != 'meta':
            nn.init.xavier_uniform_(self.inducing.data.view(1, self.num_inducing, self.dim))

    def induced(self, x: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        """H = MAB(I, X) as configured: [B, N, C] -> [B, m, C]."""
        B = x.shape[0]
        m, C = self.num_inducing, self.dim
        inducing = self.inducing.to(x.dtype)
        iq = self.induce_q
        ikv = self.induce_kv
        if iq is not None and ikv is not None:
            q = iq(inducing).reshape(1, m, self.num_heads, self.head_dim).transpose(1, 2)  # [1, H, m, D]
            k, v = ikv(x).reshape(B, x.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            qkv = self.qkv
            assert qkv is not None  # built (use_qkv=True); refines Optional for TorchScript
            q, k, v = cross_qkv(qkv.weight, qkv.bias, inducing[None], x, self.num_heads)  # q [1, H, m, D]
        q, k = self.q_norm(q), self.k_norm(k)
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        dropout_p = self.attn_drop.p if self.training else 0.
        out, _ = attention_lse(q.expand(B, -1, -1, -1), k, v, mask, scale=self.scale, dropout_p=dropout_p)
        out = out.transpose(1, 2).reshape(B, m, C)
        iproj = self.induce_proj
        out = iproj(out) if iproj is not None else self.proj(out)
        h = self.induce_norm0(inducing + out)
        fc = self.induce_fc
        if fc is not None:
            h = self.induce_norm1(h + F.relu(fc(h)))
        return h

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        kpm, _ = self.check_input(x, attn_mask, is_causal)
        h = self.induced(x, kpm)  # [B, m, C]
        qkv = self.qkv
        assert qkv is not None  # built (use_qkv=True); refines Optional for TorchScript
        q, k, v = cross_qkv(qkv.weight, qkv.bias, x, h, self.num_heads)
        dropout_p = self.attn_drop.p if self.training else 0.
        out, _ = attention_lse(self.q_norm(q), self.k_norm(k), v, None, scale=self.scale, dropout_p=dropout_p)
        return self.merge_heads(out)
