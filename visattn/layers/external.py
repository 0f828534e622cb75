"""External attention.

Paper: "Beyond Self-attention: External Attention using Two Linear Layers for Visual Tasks", Guo, Liu, Mu, Hu,
arXiv:2105.02358 (https://arxiv.org/abs/2105.02358).

Attention against two small learnable memories shared by all samples, M_k [S, C] and M_v [C, S] with S = 64:
``A = M_k F`` ([S, N]), double normalisation — softmax over the N positions, then l1 over the S memory slots
(``α_ij = exp(a_ij) / Σ_k exp(a_kj)``, ``α_ij ← α_ij / Σ_k α_ik`` in the paper's notation) — and ``F_out = M_v A``.
As in the paper's segmentation head, a 1×1 conv comes first, and a 1×1 conv with batch norm, a residual
connection and a ReLU come last: ``y = ReLU(x + BN(W_o M_v DN(M_k W_i x)))``. M_k and M_v start as transposes of
one another, drawn N(0, 2/C), which is what the released code's initialisation amounts to (there the two weights
even share their storage; here they are two memories trained independently, as the paper describes them).
Cost: O(N·S·C), linear in N.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_channels, check_int, check_nchw, masked_softmax_fp32, softmax_fp32
from ..registry import register

__all__ = ['ExternalAttention', 'double_normalization']


def double_normalization(logits: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """The paper's double normalisation of ``logits`` [..., S, N]: a softmax over the N positions (in at least
    float32), then an l1 normalisation over the S memory slots (``α / (1e-9 + Σ_slots α)``, as the released code).

    ``token_mask`` (bool, broadcastable to [..., 1, N], True = a real position) restricts the softmax to the real
    positions; padded positions get exact zeros, and a slot that sees no real position gets zeros (never NaN).
    """
    if token_mask is None:
        attn = softmax_fp32(logits, dim=-1)
    else:
        attn = masked_softmax_fp32(logits, token_mask).to(logits.dtype)
    return attn / (1e-9 + attn.sum(dim=-2, keepdim=True))


@register(
    'external', paper='Beyond Self-attention: External Attention using Two Linear Layers for Visual Tasks',
    arxiv='2105.02358', year=2021, family='context', complexity='O(N·S·C)',
)
class ExternalAttention(nn.Module):
    """External attention unit with double normalisation.

    Args:
        channels: input and output channels C.
        num_slots: size S of the two memory units (default 64).
        norm_layer: normalisation after the output conv (default BatchNorm2d).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
            self,
            channels: int,
            *,
            num_slots: int = 64,
            norm_layer: type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.num_slots = check_int('num_slots', num_slots)
        self.conv_in = nn.Conv2d(channels, channels, 1, **dd)
        self.mk = nn.Conv2d(channels, num_slots, 1, bias=False, **dd)
        self.mv = nn.Conv2d(num_slots, channels, 1, bias=False, **dd)
        self.conv_out = nn.Conv2d(channels, channels, 1, bias=False, **dd)
        self.norm = norm_layer(channels, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As the released code: convs N(0, 2/(k²·C_out)), M_k = M_vᵀ drawn N(0, 2/C), unit norm."""
        for conv in (self.conv_in, self.mv, self.conv_out):
            conv.reset_parameters()
            nn.init.kaiming_normal_(conv.weight, mode='fan_out', nonlinearity='relu')
        with torch.no_grad():
            self.mk.weight.copy_(self.mv.weight.transpose(0, 1))
        self.norm.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'ExternalAttention')
        attn = double_normalization(self.mk(self.conv_in(x)).flatten(2))  # [B, S, N]
        out = self.mv(attn.view(x.shape[0], self.num_slots, x.shape[2], x.shape[3]))
        return F.relu(x + self.norm(self.conv_out(out)))
