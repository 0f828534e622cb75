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

- ``aft_conv`` (section 3.4 of the paper, a grid mixer): ``w_{t,t'}`` depends only on the offset of t' from t on
  the H×W patch grid, inside an s×s window (0 outside), one kernel ``w^i`` [s, s] per head shared by the head's
  channels, and the key has one channel per head (``K^i`` [T], the paper's "dimensionality of K tied with #heads"):
  ``Y^i_t = σ(Q^i_t) ⊙ (conv2d(e^{K^i} ⊙ V^i, e^{w^i} - 1) + Σ_t' e^{K^i_t'} V^i_t') /
  (conv2d(e^{K^i}, e^{w^i} - 1) + Σ_t' e^{K^i_t'})`` (eq. 6, in 2-D), with the paper's re-parameterisation
  ``w^i = γ^i (w̄^i - mean(w̄^i)) / std(w̄^i) + β^i`` (γ, β [h] initialised to 0, so AFT-conv starts as AFT-simple;
  ``reparam=False`` learns w directly, initialised to 0). The parameters do not depend on the grid.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_odd, float_min, float_tiny
from ..registry import register
from ._base import GridMixer, TokenMixer, check_length, check_seq_len

__all__ = ['AFTConv', 'AFTFull', 'AFTLocal', 'AFTSimple', 'aft', 'aft_conv']


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


def aft_conv(
        q: Tensor, k: Tensor, v: Tensor, w: Tensor, H: int, W: int, num_prefix_tokens: int = 0,
        key_padding_mask: Tensor | None = None,
) -> Tensor:
    """The AFT-conv operation (eq. 6 of the paper, on a 2-D grid), computed in at least float32.

    The first ``num_prefix_tokens`` tokens are off the grid: they see every token without position bias (their
    ``w`` is 0, AFT-simple) and are seen by every token without one. Every stabilising maximum is taken over the
    real keys only.

    Args:
        q, v: [B, N, h, D] with N = num_prefix_tokens + H·W (patch tokens row-major).
        k: [B, N, h], one key channel per head.
        w: [h, s, s] position biases, s odd: ``w[i, s//2 + dy, s//2 + dx]`` is the bias of the token at
            (y + dy, x + dx) for the query at (y, x).
        H, W: the patch grid.
        num_prefix_tokens: P.
        key_padding_mask: [B, N] bool, True = a real token.

    Returns:
        [B, N, h, D] in v's dtype; a query that sees no key gets zeros.
    """
    dtype = v.dtype
    ct = torch.promote_types(dtype, torch.float32)
    q, k, v, w = q.to(ct), k.to(ct), v.to(ct), w.to(ct)
    B, N, h, D = v.shape
    P, s = num_prefix_tokens, w.shape[-1]
    if key_padding_mask is not None:
        k = k.masked_fill(~key_padding_mask[..., None], float_min(ct))
    ek = torch.exp(k - k.amax(1, keepdim=True).detach())  # [B, N, h], <= 1
    if key_padding_mask is not None:
        ek = ek * key_padding_mask[..., None]  # a row of padding only has its maximum at a padded key
    ekv = ek[..., None] * v  # [B, N, h, D]
    top = w.amax((1, 2)).clamp_min(0.).detach()  # [h]: e^{w - top} <= 1 and e^{-top} <= 1
    c = torch.exp(-top)  # the weight e^{0 - top} of a token outside the window
    kernel = torch.exp(w - top[:, None, None]) - c[:, None, None]  # e^w - 1, scaled by e^{-top}
    grid_kv = ekv[:, P:].reshape(B, H, W, h * D).permute(0, 3, 1, 2)  # [B, h·D, H, W]
    grid_k = ek[:, P:].reshape(B, H, W, h).permute(0, 3, 1, 2)  # [B, h, H, W]
    conv_kv = F.conv2d(grid_kv, kernel.repeat_interleave(D, 0)[:, None], padding=s // 2, groups=h * D)
    conv_k = F.conv2d(grid_k, kernel[:, None], padding=s // 2, groups=h)
    conv_kv = F.pad(conv_kv.flatten(2).transpose(1, 2).reshape(B, H * W, h, D), (0, 0, 0, 0, P, 0))  # [B, N, h, D]
    conv_k = F.pad(conv_k.flatten(2).transpose(1, 2), (0, 0, P, 0))  # [B, N, h]
    num = conv_kv + c[:, None] * ekv.sum(1, keepdim=True)
    den = (conv_k + c * ek.sum(1, keepdim=True))[..., None]
    out = torch.sigmoid(q) * torch.where(den > 0, num / den.clamp_min(float_tiny(ct)), 0.)
    return out.to(dtype)


@register('aft_conv', complexity='O(N·C·s²)', requires_grid=True, **{**_PAPER, 'supports_causal': False})
class AFTConv(GridMixer):
    """AFT-conv over the patch grid of a ViT: a depthwise s×s position bias per head; prefix tokens (class and
    register tokens) see every token and are seen by every token without position bias (AFT-simple).

    Args:
        dim, num_heads, ...: as `TokenMixer` (``qk_norm`` normalises the queries per head: the keys have one
            channel per head; ``attn_drop`` drops the mixed values).
        feat_size: (H, W) of the patch grid (required); any grid can be given at forward (the kernel does not
            depend on it).
        num_prefix_tokens: the class and register tokens before the patch tokens.
        kernel_size: s, odd (default 7).
        reparam: the paper's re-parameterisation of w (default True).

    Shapes:
        x: [B, P + H·W, C] -> [B, P + H·W, C]; ``attn_mask`` [B, N] bool key padding. ``is_causal`` is refused:
        the 2-D window has no causal order.

    Parameters: ``qkv`` [2C + h, C] (q, k with h channels, v), ``pos_bias`` [h, s, s] (w̄, or w when
    ``reparam=False``), ``gain`` and ``bias`` [h] (γ, β), ``proj``.
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
            feat_size: int | tuple[int, int] | None = None,
            num_prefix_tokens: int = 1,
            kernel_size: int = 7,
            reparam: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            feat_size=feat_size, num_prefix_tokens=num_prefix_tokens, use_qkv=False, device=device, dtype=dtype)
        dd = dict(device=device, dtype=dtype)
        self.kernel_size = check_odd('kernel_size', kernel_size)
        self.reparam = bool(reparam)
        self.qkv = nn.Linear(dim, 2 * dim + num_heads, bias=qkv_bias, **dd)
        self.k_norm = nn.Identity()  # one key channel per head: nothing to normalise
        self.pos_bias = nn.Parameter(torch.zeros(num_heads, kernel_size, kernel_size, **dd))
        self.gain = nn.Parameter(torch.zeros(num_heads, **dd)) if self.reparam else None
        self.bias = nn.Parameter(torch.zeros(num_heads, **dd)) if self.reparam else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """w̄ ~ N(0, 1) (the standardisation makes its scale irrelevant), γ = β = 0; w = 0 without reparam."""
        if self.pos_bias.device.type == 'meta':
            return
        with torch.no_grad():
            if self.gain is not None:
                nn.init.normal_(self.pos_bias)
                self.gain.zero_()
            else:
                self.pos_bias.zero_()
            if self.bias is not None:
                self.bias.zero_()

    def position_bias(self) -> Tensor:
        """w [h, s, s]: ``γ (w̄ - mean w̄) / std w̄ + β`` per head (population std), or w̄ without reparam."""
        w = self.pos_bias
        gain, bias = self.gain, self.bias
        if gain is None or bias is None:
            return w
        w = w.to(torch.promote_types(w.dtype, torch.float32))
        centred = w - w.mean((1, 2), keepdim=True)
        std = centred.square().mean((1, 2), keepdim=True).sqrt().clamp_min(float_tiny(w.dtype) ** 0.5)
        return gain[:, None, None] * centred / std + bias[:, None, None]

    def mix(
            self, x: Tensor, H: int, W: int, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        B, N, C = x.shape
        h, D = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).split([C, h, C], dim=-1)
        q = self.q_norm(q.reshape(B, N, h, D))
        out = aft_conv(q, k, v.reshape(B, N, h, D), self.position_bias(), H, W, self.num_prefix_tokens,
                       key_padding_mask)
        out = self.attn_drop(out).reshape(B, N, C)
        return self.proj_drop(self.proj(self.norm(out)))
