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

import math
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import float_min, float_tiny
from ..registry import register
from ._base import TokenMixer, check_length, check_seq_len

__all__ = ['AFTFull', 'AFTLocal', 'AFTSimple', 'aft']


def aft(
        q: Tensor, k: Tensor, v: Tensor, pos_bias: Tensor | None = None, key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
) -> Tensor:
    """The AFT operation on [B, H, N, D] tensors (any head split), computed in at least float32.

    Every stabilising maximum is taken over the keys a query sees (the real ones, and for causal the ones at or
    before it), so nothing hidden reaches a visible output, whatever its magnitude.

    Args:
        q, k, v: [B, H, N, D].
        pos_bias: w [N, N] (None: AFT-simple).
        key_padding_mask: [B, N] bool, True = a real token.
        is_causal: sum over t' <= t only.

    Returns:
        [B, H, N, D] in v's dtype; a query that sees no key gets zeros.
    """
    dtype = v.dtype
    ct = torch.promote_types(dtype, torch.float32)
    q, k, v = q.to(ct), k.to(ct), v.to(ct)
    valid: Tensor | None = None
    if key_padding_mask is not None:
        valid = key_padding_mask[:, None, :, None]  # [B, 1, N, 1]
        k = k.masked_fill(~valid, float_min(ct))  # below every real key: no maximum picks a padded one
    w = None if pos_bias is None else pos_bias.to(ct)
    if not is_causal:
        num, den = _aft_sums(k, v, w, valid)
    elif w is None:
        num, den = _aft_prefix_sums(k, v, valid)
    else:
        num, den = _aft_causal_biased_sums(k, v, w, valid)
    out = torch.sigmoid(q) * torch.where(den > 0, num / den.clamp_min(float_tiny(ct)), 0.)
    return out.to(dtype)


def _aft_sums(k: Tensor, v: Tensor, w: Tensor | None, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """Non-causal ``(Σ_t' e^{w_tt' + k_t'} v_t', Σ_t' e^{w_tt' + k_t'})`` over the real keys, each scaled by one
    positive factor per query and channel (the maxima of k and of each row of w over the real keys)."""
    ek = torch.exp(k - k.amax(-2, keepdim=True).detach())  # [B, H, N, D], <= 1
    if valid is not None:
        ek = ek * valid  # a row of padding only has its maximum at a padded key: zero it explicitly
    ekv = ek * v
    if w is None:
        return ekv.sum(-2, keepdim=True), ek.sum(-2, keepdim=True)
    if valid is not None:  # [B, 1, N, N]: each row's maximum over the real keys of its batch element
        w = w.masked_fill(~valid.transpose(-2, -1), float_min(w.dtype))
    ew = torch.exp(w - w.amax(-1, keepdim=True).detach())  # [N, N] or [B, 1, N, N], <= 1
    return ew @ ekv, ew @ ek


def _aft_prefix_sums(k: Tensor, v: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """Causal, no position bias: the prefix sums ``Σ_{t'<=t} e^{k_t' - m_t} (v_t', 1)`` with m_t the running
    maximum of k over t' <= t, by a Hillis-Steele scan of ``(m, num, den)`` (log2 N steps): position t combines
    positions <= t only, so a later token cannot change it, not even by rounding."""
    N = k.shape[-2]
    low = float_min(k.dtype)
    m = k.detach()
    den = torch.exp(k - m)  # ones, carrying the gradient of k
    if valid is not None:
        den = den * valid
    num = den * v
    shift = 1
    while shift < N:
        m_prev = _earlier(m, shift, low)
        top = torch.maximum(m, m_prev)
        a, b = torch.exp(m_prev - top), torch.exp(m - top)
        num, den, m = _earlier(num, shift, 0.) * a + num * b, _earlier(den, shift, 0.) * a + den * b, top
        shift *= 2
    return num, den


def _earlier(t: Tensor, shift: int, value: float) -> Tensor:
    """``t`` [..., N, D] moved ``shift`` positions later along N: position i holds ``t[i - shift]``, ``value``
    before the start."""
    return F.pad(t[..., :t.shape[-2] - shift, :], (0, 0, shift, 0), value=value)


def _aft_causal_biased_sums(k: Tensor, v: Tensor, w: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """Causal with position biases: ``Σ_{t'<=t} e^{w_tt' + k_t' - M_t} (v_t', 1)`` with M_t a maximum over the
    keys t' <= t only, in chunks of L ≈ √N tokens (memory O(N·C·√N), not O(N²·C)).

    Query t of chunk c sums (a) the chunks before c, stabilised by their maximum μ_c (all of them visible to
    every query of chunk c), with one matmul per chunk, and (b) its own chunk up to t, stabilised by the running
    maximum; the two are merged at ``M_t = max(μ_c, running max)``.
    """
    B, H, N, D = k.shape
    low = float_min(k.dtype)
    L = math.ceil(math.sqrt(N))
    nc = math.ceil(N / L)
    pad = nc * L - N
    real = torch.ones(B, 1, N, 1, dtype=k.dtype, device=k.device) if valid is None else valid.to(k.dtype)
    k, v, real = F.pad(k, (0, 0, 0, pad), value=low), F.pad(v, (0, 0, 0, pad)), F.pad(real, (0, 0, 0, pad))
    n = nc * L
    pos = torch.arange(n, device=k.device)
    w = F.pad(w, (0, pad, 0, pad)).masked_fill(pos[None, :] > pos[:, None], low)
    ew = torch.exp(w - w.amax(-1, keepdim=True).detach())  # [n, n], lower triangular, <= 1
    kc = k.unflatten(2, (nc, L))  # [B, H, nc, L, D]
    # (a) the chunks before c: μ_c = max of k over them (``low`` for c = 0)
    mu = F.pad(kc.amax(-2).cummax(2).values[:, :, :-1], (0, 0, 1, 0), value=low).detach()  # [B, H, nc, D]
    before = (pos[None, :] < torch.arange(nc, device=k.device)[:, None] * L)[..., None]  # [nc, n, 1]
    ek = torch.exp(torch.where(before, k.unsqueeze(2) - mu.unsqueeze(3), low)) * real.unsqueeze(2)  # [B,H,nc,n,D]
    rows = ew.unflatten(0, (nc, L))  # [nc, L, n]
    num_a = torch.einsum('clt,bhctd->bhcld', rows, ek * v.unsqueeze(2))
    den_a = torch.einsum('clt,bhctd->bhcld', rows, ek)
    # (b) the own chunk up to t: the running maximum of k inside the chunk
    run = kc.cummax(-2).values.detach()  # [B, H, nc, L, D]
    upto = (pos[None, :L] <= pos[:L, None])[..., None]  # [L(t), L(t'), 1]
    eb = torch.exp(torch.where(upto, kc.unsqueeze(3) - run.unsqueeze(4), low))  # [B, H, nc, L, L, D]
    eb = eb * real.unflatten(2, (nc, L)).unsqueeze(3)
    diag = ew.unflatten(0, (nc, L)).unflatten(2, (nc, L)).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [nc, L, L]
    num_b = torch.einsum('cls,bhclsd,bhcsd->bhcld', diag, eb, v.unflatten(2, (nc, L)))
    den_b = torch.einsum('cls,bhclsd->bhcld', diag, eb)
    top = torch.maximum(mu.unsqueeze(3), run)
    a, b = torch.exp(mu.unsqueeze(3) - top), torch.exp(run - top)
    num = (num_a * a + num_b * b).flatten(2, 3)[:, :, :N]
    den = (den_a * a + den_b * b).flatten(2, 3)[:, :, :N]
    return num, den


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
        check_length(self.mixer_name, n, self.seq_len)
        w = self.pos_bias[:n, :n]
        return w if self.window is None else w * self.window[:n, :n]


@register('aft_local', complexity='O(N²·C)', requires_seq_len=True, **_PAPER)
class AFTLocal(AFTFull):
    """AFT-local: `AFTFull` whose biases are learned only inside the window ``|t - t'| < local_window``
    (default 32) and are 0 outside it, so the far tokens still contribute, without a learned bias."""

    default_local_window = 32
