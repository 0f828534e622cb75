"""FMMformer: banded near-field softmax attention plus low-rank far-field kernel attention, blended by learned weights.

Paper: "FMMformer: Efficient and Flexible Transformer via Decomposed Near-field and Far-field Attention", Nguyen,
Suliafu, Osher, Chen, Wang, NeurIPS 2021, arXiv:2108.02347 (https://arxiv.org/abs/2108.02347). Inspired by the fast
multipole method, ``V̂ = (w_1 D + w_2 L) V``:

- near field ``D``: softmax attention restricted to a band of bandwidth k (``bandwidth``): query i sees the keys
  ``|i - j| < k`` (causal: ``i - k < j <= i``, the k keys ending at i, as the released causal code's band), the
  softmax normalised over the band only;
- far field ``L = Σ_l φ_l(Q) φ_l(K)ᵀ``: ``kernels`` linear-attention terms (the paper's rank r), each normalised as
  the linear transformer's, ``φ_l(q_i)ᵀ Σ_j φ_l(k_j) v_jᵀ / φ_l(q_i)ᵀ Σ_j φ_l(k_j)``, with the feature maps
  ``elu(x) + 1``, ``elu(-x) + 1`` and ``tanh(x) + 1`` (in this order, as the released code);
- blend: learnable weights per head and channel (the released code's ``[H, D]`` weights, one for the near field
  and one per far-field kernel), initialised as the released code: 0 for the near field and ``1 / kernels`` for each
  kernel.

Every piece is exact under a causal or key-padding mask (band: masked softmax; kernels: prefix sums, padded keys'
features zeroed), so the causal form sees no later token. Cost O(N·(k + kernels·D)·C).

The released causal code also divides each token's features by their sum (``φ / Σ φ``) before the kernel attention;
``normalize_features=True`` does that (the query's factor cancels, the key's reweights the keys).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_int, float_tiny
from ..registry import register
from ._base import TokenMixer
from ._sparse_utils import key_mask_of, window_attention_lse
from .linear import _linear, _zero_padding

__all__ = ['FMMAttention']


def _feature(x: Tensor, index: int) -> Tensor:
    """Far-field feature map ``index``: 0 ``elu(x) + 1``, 1 ``elu(-x) + 1``, 2 ``tanh(x) + 1``."""
    if index == 0:
        return F.elu(x) + 1
    if index == 1:
        return F.elu(-x) + 1
    return torch.tanh(x) + 1


@register(
    'fmm', paper='FMMformer: Efficient and Flexible Transformer via Decomposed Near-field and Far-field Attention',
    arxiv='2108.02347', year=2021, family='linear', complexity='O(N·(k + r·D)·C)', kind='mixer',
    supports_causal=True,
)
class FMMAttention(TokenMixer):
    """FMMformer attention: ``w_near ⊙ D V + Σ_l w_l ⊙ L_l V``.

    Args:
        dim, num_heads, ...: as `TokenMixer` (``attn_drop`` drops the near-field weights).
        bandwidth: k, keys ``|i - j| < k`` in the band (default 10, the released code's).
        kernels: far-field feature maps r, in [1, 3] (default 2: ``elu(x) + 1`` and ``elu(-x) + 1``; the released
            code's default is 1).
        normalize_features: divide the features by their sum first (the released causal code; default False).

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask`` [B, N] bool key padding.
    """

    supports_key_padding = True
    supports_causal = True
    eps: float = 1e-6
    __constants__ = TokenMixer.__constants__ + ['eps']

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
            bandwidth: int = 10,
            kernels: int = 2,
            normalize_features: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        dd = dict(device=device, dtype=dtype)
        self.bandwidth = check_int('bandwidth', bandwidth)
        self.kernels = check_int('kernels', kernels, 1, 3)
        self.normalize_features = bool(normalize_features)
        self.near_weight = nn.Parameter(torch.empty(num_heads, 1, self.head_dim, **dd))
        self.far_weight = nn.Parameter(torch.empty(self.kernels, num_heads, 1, self.head_dim, **dd))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The released code's start: no near field, the kernels averaged."""
        if self.near_weight.device.type != 'meta':
            nn.init.zeros_(self.near_weight)
            nn.init.constant_(self.far_weight, 1. / self.kernels)

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        dropout_p = self.attn_drop.p if self.training else 0.
        near = window_attention_lse(q, k, v, window=self.bandwidth - 1, causal=is_causal,
                                    key_mask=key_mask_of(key_padding_mask, q), scale=self.scale,
                                    dropout_p=dropout_p)[0]
        out = near * self.near_weight.to(near.dtype)
        for index in range(self.kernels):
            fq, fk = _feature(q, index), _feature(k, index)
            if self.normalize_features:
                tiny = float_tiny(fq.dtype)  # features that underflow to 0 stay 0, not NaN
                fq = fq / fq.sum(-1, keepdim=True).clamp_min(tiny)
                fk = fk / fk.sum(-1, keepdim=True).clamp_min(tiny)
            far = _linear(fq, _zero_padding(fk, key_padding_mask), v, causal=is_causal, eps=self.eps)
            out = out + far * self.far_weight[index].to(far.dtype)
        return out
