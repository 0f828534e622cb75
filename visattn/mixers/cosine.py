"""Transformer-MGK: softmax attention over a mixture of Gaussian keys.

Paper: "Improving Transformers with Probabilistic Attention Keys", Nguyen, Nguyen, Le, Nguyen, Tran, Baraniuk,
Ho, Osher, ICML 2022, arXiv:2110.08678 (https://arxiv.org/abs/2110.08678). Code:
https://github.com/minhtannguyen/transformer-mgk (``lra/attention.py``).

Every key position j of a head carries two keys ``k_j1 = W_K x_j`` and ``k_j2 = W_K2 x_j`` (a second key
projection) with mixture weights π_1, π_2; a query attends to position j with the posterior-like weight

    a_ij ∝ π_1 exp(-|q_i - k_j1|² / 2σ²) + π_2 exp(-|q_i - k_j2|² / 2σ²),    σ² = √D,

normalised over j, and ``out_i = Σ_j a_ij v_j``. The factor ``exp(-|q_i|²/2σ²)`` is common to a row and cancels,
so the scores are ``log Σ_r π_r exp((q_i·k_jr - |k_jr|²/2) / √D)``: a full softmax attention whose logits are a
log-sum-exp over the two Gaussian keys. Since the normalisation runs over j and r alike, this is exactly softmax
attention over the 2N keys ``[k_1; k_2]`` with the bias ``log π_r - |k_jr|²/(2√D)`` and the values ``[v; v]``,
which is how it is computed (one fused ``scaled_dot_product_attention``, any mask, zeros for a row that sees no
key); with attention dropout in training, or for the hard variant, the N×N weights are formed explicitly (the
dropout then drops a_ij, not its two components). The paper's point is to replace redundant heads: MGK with H heads
matches softmax attention with 2H. O(N²·C).

Mixture weights (the released code's default learnable form): ``π = clamp(p, 0, 1)`` with one learnable p [2]
shared by the heads of the layer, initialised to (0.5, 0.5); only the ratio π_1 / π_2 matters (a common factor
cancels in the normalisation, so (0, 0) acts as (½, ½) here where the code would divide 0 by 0).
``mixture='hard'`` is the paper's hard-E-step variant: the nearer key only, ``max_r`` instead of the log-sum-exp,
no π. Not offered: the soft-E-step variant, whose π per head and position are EM statistics updated in place in
training (a fixed maximum length and state outside autograd).

The issue tracker names this mixer ``cosine``; the registry keeps that name.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import float_tiny
from ..registry import register
from ._base import TokenMixer, combine_masks, masked_softmax, softmax_attention

__all__ = ['MixtureOfGaussianKeysAttention']


@register(
    'cosine', paper='Improving Transformers with Probabilistic Attention Keys', arxiv='2110.08678', year=2022,
    family='softmax', complexity='O(N²·C)', kind='mixer', supports_causal=True,
)
class MixtureOfGaussianKeysAttention(TokenMixer):
    """Softmax attention over two Gaussian keys per position (see the module docstring).

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`; ``qkv`` gives q, the first keys and v, ``k2`` the second keys; with
            ``qk_norm`` both keys are normalised).
        mixture: ``'soft'`` (default, the learnable π) or ``'hard'`` (the nearer key).
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask``: [B, N] bool key padding or any mask broadcastable to
        [B, H, N, N] (SDPA's convention: bool True = attend, float = added to the logits).
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
            mixture: str = 'soft',
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        if mixture not in ('soft', 'hard'):
            raise ValueError(f"mixture must be 'soft' or 'hard', got {mixture!r}")
        self.mixture = mixture
        self.k2 = nn.Linear(dim, dim, bias=qkv_bias, device=device, dtype=dtype)
        self.pi = nn.Parameter(torch.full((2,), 0.5, device=device, dtype=dtype)) if mixture == 'soft' else None

    def logits(self, q: Tensor, k1: Tensor, k2: Tensor) -> Tensor:
        """``log Σ_r π_r exp((q·k_r - |k_r|²/2) / √D)`` (soft) or ``max_r`` of the same without π (hard), in at
        least float32: [B, H, N, N]."""
        dtype = torch.promote_types(q.dtype, torch.float32)
        q, k1, k2 = q.to(dtype), k1.to(dtype), k2.to(dtype)
        s1 = (q @ k1.transpose(-2, -1) - k1.square().sum(-1)[..., None, :] / 2) * self.scale
        s2 = (q @ k2.transpose(-2, -1) - k2.square().sum(-1)[..., None, :] / 2) * self.scale
        pi = self.pi
        if pi is None:
            return torch.maximum(s1, s2)
        log_pi = torch.log(pi.to(dtype).clamp(float_tiny(dtype), 1.))
        return torch.logaddexp(s1 + log_pi[0], s2 + log_pi[1])

    def keys_as_sdpa(
            self, q: Tensor, k1: Tensor, k2: Tensor, v: Tensor, key_padding_mask: Tensor | None,
            attn_mask: Tensor | None, is_causal: bool,
    ) -> Tensor:
        """The soft mixture as one softmax attention over the 2N keys ``[k_1; k_2]`` with the bias
        ``log π_r - |k_jr|²/(2√D)`` and the values ``[v; v]`` (fused ``scaled_dot_product_attention``)."""
        dtype = torch.promote_types(q.dtype, torch.float32)
        q, k1, k2, vf = q.to(dtype), k1.to(dtype), k2.to(dtype), v.to(dtype)
        pi = self.pi
        assert pi is not None  # the soft mixture; refines Optional[Tensor] for TorchScript
        log_pi = torch.log(pi.to(dtype).clamp(float_tiny(dtype), 1.))
        bias = torch.cat([log_pi[0] - k1.square().sum(-1) * (self.scale / 2),
                          log_pi[1] - k2.square().sum(-1) * (self.scale / 2)], dim=-1)[:, :, None, :]  # [B, H, 1, 2N]
        mask = combine_masks(key_padding_mask, attn_mask, is_causal, q.shape[-2], q.device)
        if mask is not None:
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, device=q.device, dtype=dtype).masked_fill(~mask, float('-inf'))
            bias = bias + torch.cat([mask, mask], dim=-1).to(dtype)
        out = softmax_attention(q, torch.cat([k1, k2], dim=2), torch.cat([vf, vf], dim=2), attn_mask=bias,
                                scale=self.scale)
        return out.to(v.dtype)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        kpm, dense = self.check_input(x, attn_mask, is_causal)
        q, k1, v = self.split_heads(x)
        B, N, _ = x.shape
        k2 = self.k_norm(self.k2(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2))
        dropping = self.training and self.attn_drop.p > 0.
        if self.pi is not None and not dropping:
            out = self.keys_as_sdpa(q, k1, k2, v, kpm, dense, is_causal)
        else:  # the hard variant, or dropout on the mixture's weights a_ij
            weights = masked_softmax(self.logits(q, k1, k2), kpm, dense, is_causal)
            out = (self.attn_drop(weights) @ v.to(weights.dtype)).to(v.dtype)
        return self.merge_heads(out)
