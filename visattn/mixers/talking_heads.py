"""Talking-heads attention: learned mixing of the heads before and after the softmax.

Paper: "Talking-Heads Attention", Noam Shazeer, Zhenzhong Lan, Youlong Cheng, Nan Ding, Le Hou, arXiv 2020,
arXiv:2003.02436 (https://arxiv.org/abs/2003.02436). Used in CaiT ("Going deeper with Image Transformers",
Touvron et al., ICCV 2021, arXiv:2103.17239), whose implementation is timm's ``TalkingHeadAttn``
(``timm/models/cait.py``).

Multi-head attention computes H logit maps ``J_h = q_h k_hᵀ / sqrt(D)`` and softmaxes each on its own. Talking heads
mix the maps across heads at every pair (i, j), once on the logits (P_l) and once on the weights (P_w):

    L_g = Σ_h P_l[g, h] J_h + b_l[g]        (g = 1..h_l, the "logit heads")
    W_g = softmax_j(L_g)
    U_h = Σ_g P_w[h, g] W_g + b_w[h]
    out_h = U_h v_h

P_l is ``proj_l`` and P_w is ``proj_w``, ``nn.Linear`` over the head dimension as in timm, so that timm's
``TalkingHeadAttn`` weights (and CaiT checkpoints' self-attention layers) load unchanged; with the same weights the
output equals timm's. The paper writes the projections without biases and lets the heads of the queries and keys
(h_k), of the softmax (h_l) and of the values (h_v) differ; here h_k = h_v = H (the heads of timm's ``qkv``) and
h_l is free. timm uses square projections with biases. Default: timm's
(``talking_bias=True``, ``num_logit_heads=None`` = H); ``talking_bias=False`` and ``num_logit_heads`` give the
paper's general form. The weights U are not normalised (they can be negative and need not sum to 1).

Masks (timm's layer has none): a mask hides a pair (i, j) (from every head, or per head for a mask with a head
dimension). The mixing acts on each pair on its own,
so the mask is applied to the mixed logits L before the softmax (hidden pairs get weight 0, statistics over the
visible keys only), and again to U after ``proj_w``: U at a hidden pair would otherwise be the bias b_w[h] and let
the hidden value v_j into the output. A row that sees no key gives zeros. A dense mask with a head dimension names
the heads of L and U alike, so it needs ``num_logit_heads == num_heads`` (or a head dimension of 1).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_int, masked_softmax_fp32, softmax_fp32
from ..registry import register
from ._base import TokenMixer, combine_masks
from .normalized import split_mask

__all__ = ['TalkingHeadsAttention', 'mix_heads']


def mix_heads(t: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Mix the heads of ``t`` [B, H, N, M] by ``weight`` [H', H] and ``bias`` [H'] -> [B, H', N, M], in ``t``'s
    dtype (``nn.Linear`` over the head dimension)."""
    B, _, N, M = t.shape
    out = torch.matmul(weight.to(t.dtype), t.reshape(B, t.shape[1], N * M))  # [B, H', N·M]
    if bias is not None:
        out = out + bias.to(t.dtype)[:, None]
    return out.view(B, weight.shape[0], N, M)


@register(
    'talking_heads', paper='Talking-Heads Attention', arxiv='2003.02436', year=2020, family='softmax',
    complexity='O(N²·(C + H²))', kind='mixer', supports_causal=True,
)
class TalkingHeadsAttention(TokenMixer):
    """Softmax attention whose heads are mixed by ``proj_l`` on the logits and ``proj_w`` on the weights.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`).
        num_logit_heads: h_l, the heads between ``proj_l`` and ``proj_w`` (default None: ``num_heads``, timm's).
        talking_bias: biases in ``proj_l`` and ``proj_w`` (timm: True; the paper: False).
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
            num_logit_heads: int | None = None,
            talking_bias: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        dd = dict(device=device, dtype=dtype)
        heads = num_heads if num_logit_heads is None else check_int('num_logit_heads', num_logit_heads)
        self.num_logit_heads = heads
        self.proj_l = nn.Linear(num_heads, heads, bias=talking_bias, **dd)
        self.proj_w = nn.Linear(heads, num_heads, bias=talking_bias, **dd)

    def weights(
            self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None, is_causal: bool,
    ) -> Tensor:
        """The mixed weights U [B, H, N, N] (at least float32) of ``q``, ``k`` [B, H, N, D], before dropout."""
        ct = torch.promote_types(q.dtype, torch.float32)
        logits = mix_heads(torch.matmul(q.to(ct) * self.scale, k.to(ct).transpose(-1, -2)), self.proj_l.weight,
                           self.proj_l.bias)
        mask = combine_masks(key_padding_mask, attn_mask, is_causal, k.shape[-2], q.device)
        if mask is not None and self.num_logit_heads != self.num_heads and mask.dim() >= 3 and mask.shape[-3] != 1:
            raise ValueError(
                f'{self.mixer_name}: a per-head attn_mask needs num_logit_heads == num_heads '
                f'({self.num_logit_heads} != {self.num_heads}); got a mask of shape {list(mask.shape)}')
        visible, bias = split_mask(mask)
        if bias is not None:
            logits = logits + bias.to(ct)
        if visible is None:
            return mix_heads(softmax_fp32(logits, dim=-1), self.proj_w.weight, self.proj_w.bias)
        u = mix_heads(masked_softmax_fp32(logits, visible), self.proj_w.weight, self.proj_w.bias)
        return u.masked_fill(~visible, 0.)

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        w = self.attn_drop(self.weights(q, k, key_padding_mask, attn_mask, is_causal))
        return torch.matmul(w.to(v.dtype), v)
