"""External attention in token form, multi-head: attention against two small learnable memories.

Paper: "Beyond Self-attention: External Attention using Two Linear Layers for Visual Tasks", Guo, Liu, Mu, Hu,
IEEE TPAMI 2022, arXiv:2105.02358 (https://arxiv.org/abs/2105.02358). The 2-D segmentation block is
`visattn.layers.external`; this is the token form of the paper's multi-head external attention (its eq. 5-6 and
the EAMLP backbone), on the same double normalisation (`visattn.layers.external.double_normalization`).

For tokens F [N, C] split into heads F_h [N, D] (memories shared by the heads, S slots):

    A_h = F_h M_kᵀ                                 [N, S]
    α_h = DN(A_h): softmax over the N tokens (per slot), then l1 over the S slots (per token)
    out = Concat_h(α_h M_v) W_o                    M_k [S, D], M_v [D, S]

O(N·S·C), linear in N. F is a linear projection of the tokens (``q``, the EAMLP code's ``trans_dims``;
``expansion=e`` widens it to e·C channels and e·H heads of D = C/H each, the EAMLP code's ``coef`` (4 there);
default 1, the paper's equations). The memories have no bias (the paper's M_k, M_v; the EAMLP code's linear layers
have one) and start as transposes of one another drawn N(0, 2/D), as in the released segmentation code.
``attn_drop`` drops α (as the EAMLP code); ``qk_norm`` normalises the queries per head.

Key padding is exact: the softmax over the tokens runs over the real tokens only, so a padded token neither takes
a share of a slot nor changes another token's l1 normalisation. The softmax over all N tokens has no causal form
in the paper; ``is_causal=True`` is refused.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_int
from ..layers.external import double_normalization
from ..registry import register
from ._base import TokenMixer

__all__ = ['ExternalAttentionMixer']


@register(
    'external', paper='Beyond Self-attention: External Attention using Two Linear Layers for Visual Tasks',
    arxiv='2105.02358', year=2021, family='memory', complexity='O(N·S·C)', kind='mixer',
)
class ExternalAttentionMixer(TokenMixer):
    """Multi-head external attention over two memories shared by the heads, with double normalisation.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`; ``qkv_bias`` is the bias of ``q``).
        num_slots: S, slots of each memory (default 64, the paper's).
        expansion: e, width factor of the projected tokens and of the number of heads (default 1).
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask`` [B, N] bool key padding (True = real token).

    Parameters: ``q`` [e·C, C], ``mk`` [S, D] (M_k), ``mv`` [D, S] (M_v), ``proj`` [C, e·C].
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
            num_slots: int = 64,
            expansion: int = 1,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            use_qkv=False, use_proj=False, device=device, dtype=dtype)
        dd = dict(device=device, dtype=dtype)
        self.num_slots = check_int('num_slots', num_slots)
        self.expansion = check_int('expansion', expansion)
        self.heads = num_heads * expansion
        inner = dim * expansion
        self.q = nn.Linear(dim, inner, bias=qkv_bias, **dd)
        self.k_norm = nn.Identity()  # the keys are the memory M_k
        self.mk = nn.Linear(self.head_dim, num_slots, bias=False, **dd)
        self.mv = nn.Linear(num_slots, self.head_dim, bias=False, **dd)
        self.norm = norm_layer(inner, **dd) if scale_norm and norm_layer is not None else nn.Identity()
        self.proj = nn.Linear(inner, dim, bias=proj_bias, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """M_v ~ N(0, 2/D) (Kaiming, fan-out), M_k = M_vᵀ: the released segmentation code's initialisation."""
        if self.mv.weight.device.type == 'meta':
            return
        nn.init.kaiming_normal_(self.mv.weight, mode='fan_out', nonlinearity='relu')
        with torch.no_grad():
            self.mk.weight.copy_(self.mv.weight.transpose(0, 1))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        kpm, _ = self.check_input(x, attn_mask, is_causal)
        B, N, _ = x.shape
        ct = torch.promote_types(x.dtype, torch.float32)
        q = self.q_norm(self.q(x).reshape(B, N, self.heads, self.head_dim).transpose(1, 2))  # [B, eH, N, D]
        logits = self.mk(q).to(ct).transpose(-2, -1)  # [B, eH, S, N]
        attn = double_normalization(logits, None if kpm is None else kpm[:, None, None, :])
        attn = self.attn_drop(attn)
        out = self.mv(attn.transpose(-2, -1).to(x.dtype))  # [B, eH, N, D]
        return self.proj_drop(self.proj(self.norm(out.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))))
