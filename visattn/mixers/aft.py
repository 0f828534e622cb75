"""Attention Free Transformer (AFT): element-wise gating of position-biased, key-weighted value averages.

Paper: "An Attention Free Transformer", Zhai, Talbott, Srivastava, Huang, Goh, Zhang, Susskind, 2021,
arXiv:2105.14103.

``Y_t = σ(Q_t) ⊙ Σ_t' exp(K_t' + w_{t,t'}) ⊙ V_t' / Σ_t' exp(K_t' + w_{t,t'})`` (per channel):

- ``aft_full``: ``w`` [T, T] learned pair-wise position biases (T = ``seq_len``), initialised to zero;
- ``aft_local``: as full, but ``w_{t,t'}`` is set to 0 outside the window ``|t - t'| < local_window`` (the
  far tokens still contribute, without a learned bias);
- ``aft_simple``: no position biases, ``Y_t = σ(Q_t) ⊙ Σ_t' softmax(K)_t' ⊙ V_t'``, O(N·C).

Causal (``is_causal=True``) restricts the sums to t' <= t, as in the paper's autoregressive models. Parameters
``qkv`` and ``proj`` are named as in timm's ``Attention``; the heads play no role (AFT works per channel).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
from torch import Tensor

from ..registry import register
from ._base import TokenMixer, check_length, check_seq_len

__all__ = ['AFTFull', 'AFTLocal', 'AFTSimple', 'aft']


def aft(
        q: Tensor, k: Tensor, v: Tensor, pos_bias: Tensor | None = None, key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
) -> Tensor:
    """The AFT operation on [B, H, N, D] tensors (any head split), computed in float32.

    Args:
        q, k, v: [B, H, N, D].
        pos_bias: w [N, N] (None: AFT-simple).
        key_padding_mask: [B, N] bool, True = a real token.
        is_causal: sum over t' <= t only.

    Returns:
        [B, H, N, D] in v's dtype; a query that sees no key gets zeros.
    """
    dtype = v.dtype
    q, k, v = q.float(), k.float(), v.float()
    ek = torch.exp(k - k.amax(-2, keepdim=True).detach())  # the per-channel max cancels in the ratio
    if key_padding_mask is not None:
        ek = ek * key_padding_mask[:, None, :, None]
    ekv = ek * v
    if pos_bias is None:
        if is_causal:
            num, den = ekv.cumsum(-2), ek.cumsum(-2)
        else:
            num, den = ekv.sum(-2, keepdim=True), ek.sum(-2, keepdim=True)
    else:
        w = pos_bias.float()
        if is_causal:
            w = w.masked_fill(~torch.ones_like(w, dtype=torch.bool).tril(), float('-inf'))
        ew = torch.exp(w - w.amax(-1, keepdim=True).detach())  # [N, N]; the row max cancels in the ratio
        num, den = ew @ ekv, ew @ ek
    out = torch.sigmoid(q) * torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), 0.)
    return out.to(dtype)


_PAPER = dict(paper='An Attention Free Transformer', arxiv='2105.14103', year=2021, family='attention-free',
              kind='mixer', supports_causal=True)


@register('aft_simple', complexity='O(N·C)', **_PAPER)
class AFTSimple(TokenMixer):
    """AFT-simple: ``σ(Q_t) ⊙ Σ_t' softmax(K)_t' ⊙ V_t'`` (softmax over the tokens, per channel).

    Args:
        dim, num_heads, ...: as `TokenMixer` (``attn_drop`` drops the mixed values).

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask`` [B, N] bool key padding.
    """

    supports_key_padding = True
    supports_causal = True

    def position_bias(self, n: int) -> Tensor | None:
        """w [n, n] for an input of n tokens (None: no position biases)."""
        return None

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        return self.attn_drop(aft(q, k, v, self.position_bias(q.shape[-2]), key_padding_mask, is_causal))


@register('aft_full', complexity='O(N²·C)', requires_seq_len=True, **_PAPER)
class AFTFull(AFTSimple):
    """AFT-full: learned pair-wise position biases ``w`` [seq_len, seq_len], initialised to zero.

    Args:
        dim, num_heads, ...: as `TokenMixer`.
        seq_len: T, the longest input (required); a shorter input uses ``w[:N, :N]``.
        local_window: s; when given, ``w_{t,t'}`` is learned only inside ``|t - t'| < s`` and is 0 outside
            (AFT-local). Default: ``default_local_window`` (None here: AFT-full; 32 for `AFTLocal`).

    Shapes:
        x: [B, N, C] -> [B, N, C] with N <= seq_len; ``attn_mask`` [B, N] bool key padding.
    """

    default_local_window: ClassVar[int | None] = None

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
            seq_len: int | None = None,
            local_window: int | None = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        self.seq_len = check_seq_len(seq_len)
        self.pos_bias = nn.Parameter(torch.zeros(seq_len, seq_len, device=device, dtype=dtype))
        self.local_window = self.default_local_window if local_window is None else local_window
        window = None
        if self.local_window is not None:
            s = check_seq_len(self.local_window, 'local_window')
            t = torch.arange(self.seq_len, device=device)
            window = (t[:, None] - t[None, :]).abs() < s
        self.register_buffer('window', window, persistent=False)

    def position_bias(self, n: int) -> Tensor:
        check_length(type(self).__name__, n, self.seq_len)
        w = self.pos_bias[:n, :n]
        return w if self.window is None else w * self.window[:n, :n]


@register('aft_local', complexity='O(N²·C)', requires_seq_len=True, **_PAPER)
class AFTLocal(AFTFull):
    """AFT-local: `AFTFull` whose biases are learned only inside the window ``|t - t'| < local_window``
    (default 32) and are 0 outside it, so the far tokens still contribute, without a learned bias."""

    default_local_window = 32
