"""Linear randomized attention (LARA).

Paper: "Linear Complexity Randomized Self-attention Mechanism", Zheng, Wang, Kong, ICML 2022, arXiv:2204.04667
(https://arxiv.org/abs/2204.04667). Code: https://github.com/HKUNLP/efficient-attention (``lara.py``).

Softmax attention is an expectation: with ``ξ(x, ω) = exp(ωᵀx - |x|²/2)`` and ``x = D^{-1/4} q`` (and k),
``SA(q_n) = E_{p_n}[f(ω)]`` for the density ``p_n(ω) ∝ N(ω; 0, I) ξ(q_n, ω) Σ_m ξ(k_m, ω)`` and the query-free
``f(ω) = Σ_m ξ(k_m, ω) v_m / Σ_m ξ(k_m, ω)``. LARA estimates it by self-normalised multiple importance sampling
with C proposals ``q_c(ω) = N(ω; μ_c, I)``, ``μ_c = q̄_c + k̄_c`` (the means of the queries and the keys of the c-th
of C consecutive segments), S samples ``ω_cs = μ_c + ε_cs`` each:

    LARA(q_n) = Σ_cs w_ncs f(ω_cs) / Σ_cs w_ncs,
    w_ncs = α_nc(ω_cs) · N(ω_cs; 0, I) ξ(q_n, ω_cs) Σ_m ξ(k_m, ω_cs) / q_c(ω_cs),

with the query-specific weighting functions of the paper's optimised form (``mis='opt'``, default)
``α_nc(ω) = q_c(ω) / Σ_c' q_c'(ω) + r_nc - (1/C) Σ_c' r_nc'``, ``r_nc = softmax_c(x_nᵀ q̄_c)`` (they sum to one over c
for every ω, so the estimator is consistent), or the balance heuristic alone (``mis='bh'``: ``α = q_c / Σ q_c'``).
Every sum over the N keys is shared by the queries: O(N·C·S·D) time and memory, no N×N matrix.

Approximations and choices (the paper and the released code agree unless said):
    - α can be negative under ``'opt'``; its logarithm is taken of ``max(α, 1e-8)`` (the released code), which
      biases the estimate slightly where that clamp acts; ``'bh'`` is exactly consistent;
    - training draws ``ε ~ N(0, I)`` afresh at every forward (``num_samples`` per proposal; the code's
      ``use_multisample`` is S = 2); evaluation uses ``ω = μ_c`` (the released code), or, with
      ``sample_in_eval=True``, S samples drawn from ``seed`` (deterministic);
    - the released code draws ε in the unscaled space of q (a spread of ``D^{-1/4}`` in the scaled space, where
      its importance weights assume unit variance); here ε is drawn where the weights assume it (unit variance);
    - proposals: ``proposal='mean'`` (default) takes plain segment means (the paper's μ_c); ``'adaptive'`` first
      maps each token's q and k by a ``Linear + LayerNorm`` over the head dim, shared by the heads (the released
      code's learned 1-D proposal), then scales the means by ``D^{-1/4}`` as the code does.

Not causal (the proposals pool the whole sequence, as the paper and its code). Padding (``attn_mask`` [B, N]) is
exact: padded tokens are left out of the segment means, of the keys' sums and of the proposals (a segment with no
real token gives no proposal).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_int, float_min, float_tiny, masked_softmax_fp32
from ..ops._dispatch import upcast
from ..registry import register
from ._base import TokenMixer
from ._sparse_utils import SeededMixin, hash_normal
from .lowrank import _segment_means

__all__ = ['LinearRandomizedAttention', 'lara_attention']

def _log_xi(x: Tensor, omega: Tensor) -> Tensor:
    """``log ξ(x, ω) = ωᵀx - |x|²/2``: x [B, H, N, D], ω [B, H, P, D] -> [B, H, P, N] (one augmented product)."""
    x_aug = torch.cat([x, -x.square().sum(-1, keepdim=True) / 2], dim=-1)
    return torch.cat([omega, torch.ones_like(omega[..., :1])], dim=-1) @ x_aug.transpose(-2, -1)


def lara_attention(
        q: Tensor, k: Tensor, v: Tensor, q_bar: Tensor, k_bar: Tensor, seg_ok: Tensor, noise: Tensor | None,
        key_padding_mask: Tensor | None = None, mis: str = 'opt',
) -> Tensor:
    """The LARA estimate of softmax attention.

    Args:
        q, k: [B, H, N, D], already scaled by ``D^{-1/4}``; v: [B, H, N, Dv].
        q_bar, k_bar: [B, H, C, D] the proposal statistics (``μ_c = q̄_c + k̄_c``; ``q̄`` also sets ``r_nc``).
        seg_ok: [B, 1, C] bool, the proposals that exist (their segment holds a real token).
        noise: [B or 1, H or 1, S, C, D] the samples' offsets ε from μ_c, or None for ``ω = μ_c`` (S = 1).
        key_padding_mask: [B, N] bool, True = a real key.
        mis: ``'opt'`` or ``'bh'``.

    Returns:
        [B, H, N, Dv].
    """
    B, H, C, D = q_bar.shape
    mu = q_bar + k_bar
    samples = mu[:, :, None] if noise is None else mu[:, :, None] + noise  # [B, H, S, C, D]
    S = samples.shape[2]
    omega = samples.flatten(2, 3)  # [B, H, S·C, D]: sample s of proposal c at s·C + c
    ok = seg_ok.repeat(1, 1, S)  # [B, 1, S·C]
    log_q = _log_xi(q, omega)  # [B, H, S·C, N]
    log_k = _log_xi(k, omega)
    if key_padding_mask is not None:
        log_k = log_k.masked_fill(~key_padding_mask[:, None, None, :], float_min(log_k.dtype))
    top = log_k.amax(-1, keepdim=True).detach()
    xi_k = torch.exp(log_k - top)  # ξ(k_m, ω) up to a factor per sample
    z = xi_k.sum(-1, keepdim=True)
    f = (xi_k @ v) / z  # f(ω) [B, H, S·C, Dv]
    log_z = torch.log(z) + top  # log Σ_m ξ(k_m, ω)
    # log q_c'(ω) up to the -|ω|²/2 + const shared with N(ω; 0, I): ωᵀμ_c' - |μ_c'|²/2, [B, H, S·C, C]
    log_prop = omega @ mu.transpose(-2, -1) - mu.square().sum(-1)[:, :, None, :] / 2
    if key_padding_mask is not None:  # (without padding every segment holds tokens)
        log_prop = log_prop.masked_fill(~seg_ok[:, :, None, :], float_min(log_prop.dtype))
    own = torch.arange(S * C, device=q.device) % C
    log_own = log_prop.gather(-1, own.expand(B, H, S * C)[..., None])  # log q_c(ω_cs), [B, H, S·C, 1]
    balance = torch.exp(log_own - torch.logsumexp(log_prop, dim=-1, keepdim=True))  # [B, H, S·C, 1]
    if mis == 'opt':
        logits = q_bar @ q.transpose(-2, -1)  # [B, H, C, N]
        if key_padding_mask is None:
            r = torch.softmax(logits, dim=-2)
            r_centred = r - 1. / C
        else:
            r = masked_softmax_fp32(logits, seg_ok[..., None], dim=-2).to(q.dtype)
            r_centred = r - r.sum(-2, keepdim=True) / seg_ok.sum(-1, keepdim=True)[..., None].clamp_min(1)
        alpha = balance + r_centred.repeat(1, 1, S, 1)
        log_alpha = torch.log(alpha.clamp_min(1e-8))  # the released code's floor of α
    else:
        log_alpha = torch.log(balance.clamp_min(float_tiny(balance.dtype)))
    log_w = log_q + log_alpha + (log_z - log_own)  # [B, H, S·C, N]
    if key_padding_mask is None:
        weights = torch.softmax(log_w, dim=-2)
    else:
        weights = masked_softmax_fp32(log_w, ok[..., None].expand_as(log_w), dim=-2).to(q.dtype)
    return weights.transpose(-2, -1) @ f


@register(
    'lara', paper='Linear Complexity Randomized Self-attention Mechanism', arxiv='2204.04667', year=2022,
    family='linear', complexity='O(N·S·m·C/H)', kind='mixer',
)
class LinearRandomizedAttention(SeededMixin, TokenMixer):
    """Linear randomized attention (see the module docstring for the estimator and its choices).

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`; ``attn_drop`` drops the mixed values).
        num_landmarks: proposals C (default 49, the paper's ViT setting); an input of N tokens is cut into
            ``ceil(N / ceil(N / C))`` segments (N < C: one per token).
        num_samples: samples S per proposal in training (and in evaluation with ``sample_in_eval``), default 1.
        mis: ``'opt'`` (default, the paper's weighting functions) or ``'bh'`` (balance heuristic).
        proposal: ``'mean'`` (default) or ``'adaptive'`` (see the module docstring).
        sample_in_eval: draw S samples (from ``seed``) in evaluation too, instead of ``ω = μ_c``.
        seed: seed of the evaluation samples (default None: drawn at construction; see `SeededMixin`).
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask``: [B, N] bool key padding (True = real token), exact.
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
            num_landmarks: int = 49,
            num_samples: int = 1,
            mis: str = 'opt',
            proposal: str = 'mean',
            sample_in_eval: bool = False,
            seed: int | None = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        self.num_landmarks = check_int('num_landmarks', num_landmarks)
        self.num_samples = check_int('num_samples', num_samples)
        if mis not in ('opt', 'bh'):
            raise ValueError(f"mis must be 'opt' or 'bh', got {mis!r}")
        if proposal not in ('mean', 'adaptive'):
            raise ValueError(f"proposal must be 'mean' or 'adaptive', got {proposal!r}")
        self.mis = mis
        self.proposal = proposal
        self.sample_in_eval = sample_in_eval
        self.init_seed(seed)
        D = self.head_dim
        dd = dict(device=device, dtype=dtype)
        if proposal == 'adaptive':
            self.q_bar_gen = nn.Sequential(nn.Linear(D, D, **dd), nn.LayerNorm(D, **dd))
            self.k_bar_gen = nn.Sequential(nn.Linear(D, D, **dd), nn.LayerNorm(D, **dd))
        else:
            self.q_bar_gen = nn.Identity()
            self.k_bar_gen = nn.Identity()

    def segments(self, n: int) -> int:
        """The number of proposals C for ``n`` tokens."""
        return math.ceil(n / math.ceil(n / min(self.num_landmarks, n)))

    def noise(self, like: Tensor, C: int) -> Tensor | None:
        """The samples' offsets ε [B or 1, H, S, C, D], or None for ``ω = μ`` (evaluation default)."""
        B, H, _, D = like.shape
        if self.training:
            return torch.randn(B, H, self.num_samples, C, D, device=like.device, dtype=like.dtype)
        if self.sample_in_eval:
            return hash_normal(self.seed, [1, H, self.num_samples, C, D]).to(like.device, like.dtype)
        return None

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        B, H, N, D = q.shape
        dtype = v.dtype
        c = D ** -0.25
        q, k, vf = upcast(q), upcast(k), upcast(v)
        valid = torch.ones(B, N, dtype=torch.bool, device=q.device) if key_padding_mask is None \
            else key_padding_mask
        C = self.segments(N)
        q_bar, seg_ok = _segment_means(self.q_bar_gen(q), valid, C)  # [B, H, C, D], [B, 1, C]
        k_bar, _ = _segment_means(self.k_bar_gen(k), valid, C)
        q, k, q_bar, k_bar = q * c, k * c, q_bar * c, k_bar * c  # to the scaled space of x = D^{-1/4} q
        if key_padding_mask is not None:
            vf = vf * key_padding_mask[:, None, :, None].to(vf.dtype)
        out = lara_attention(q, k, vf, q_bar, k_bar, seg_ok, self.noise(q, C), key_padding_mask, self.mis)
        return self.attn_drop(out.to(dtype))
