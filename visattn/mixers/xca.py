"""Cross-covariance attention (XCA): attention across feature channels instead of tokens.

Paper: "XCiT: Cross-Covariance Image Transformers", El-Nouby, Touvron, Caron, Bojanowski, Douze, Joulin,
Laptev, Neverova, Synnaeve, Verbeek, Jégou, NeurIPS 2021, arXiv:2106.09681.

Per head, ``XCA(Q, K, V) = V · softmax(K̂ᵀ Q̂ / τ)`` where q and k are l2-normalised along the tokens and τ is a
learned per-head temperature (``temperature`` holds 1/τ, initialised to 1, as timm's ``XCA``): the D×D
attention map costs O(N·D²) per head, linear in N. Parameter names follow timm's ``XCA`` (``qkv``,
``temperature``, ``proj``), so XCiT weights load.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import softmax_fp32
from ..registry import register
from ._base import TokenMixer

__all__ = ['CrossCovarianceAttention']


@register(
    'xca', paper='XCiT: Cross-Covariance Image Transformers', arxiv='2106.09681', year=2021,
    family='cross-covariance', complexity='O(N·C²/H)', kind='mixer',
)
class CrossCovarianceAttention(TokenMixer):
    """XCiT's cross-covariance attention.

    A padded token (``attn_mask`` False) is left out of the covariance: its q, k and v are zeroed before the
    l2 normalisation over tokens, so the real tokens' outputs do not depend on it.

    Args:
        dim, num_heads, ...: as `TokenMixer`.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask`` [B, N] bool key padding (True = real token).
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
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1, device=device, dtype=dtype))

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        if key_padding_mask is not None:
            keep = key_padding_mask[:, None, :, None].to(q.dtype)
            q, k, v = q * keep, k * keep, v * keep
        q, k = F.normalize(q.transpose(-2, -1), dim=-1), F.normalize(k.transpose(-2, -1), dim=-1)  # [B, H, D, N]
        attn = self.attn_drop(softmax_fp32((q @ k.transpose(-2, -1)) * self.temperature, dim=-1))  # [B, H, D, D]
        return (attn @ v.transpose(-2, -1)).transpose(-2, -1)  # [B, H, N, D]
