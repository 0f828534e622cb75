"""Fast weight programmer with the delta update rule and DPFP features (DeltaNet).

Paper: "Linear Transformers Are Secretly Fast Weight Programmers", Schlag, Irie, Schmidhuber, ICML 2021,
arXiv:2102.11174 (https://arxiv.org/abs/2102.11174). Code: https://github.com/IDSIA/lmtool-fwms.

A fast weight matrix W (Dv × F per head) is programmed token by token. With ``φ`` the DPFP feature map followed
by the paper's sum normalisation ``φ(x) / Σ_f φ(x)_f``, and a write strength ``β_i = σ(W_β x_i)`` per head:

    v̄_i = W_{i-1} φ(k_i),    W_i = W_{i-1} + β_i (v_i - v̄_i) φ(k_i)ᵀ,    y_i = W_i φ(q_i).

The delta rule replaces the value stored under ``φ(k_i)`` (linear attention only adds to it); there is no
attention normaliser (the sum normalisation keeps the write bounded). DPFP_ν of x ∈ R^D (F = 2·D·ν):
``r = [relu(x), relu(-x)]``, ``φ_ν(x) = [r ⊙ roll(r, 1), ..., r ⊙ roll(r, ν)]``.

Computed exactly in chunks of L tokens (the UT / WY form of the delta rule): inside a chunk the updates
``u_t = β_t (v_t - W_{c-1} φ(k_t) - Σ_{s<t} (φ(k_s)·φ(k_t)) u_s)`` solve one unit lower-triangular system
``(I + diag(β) tril₋₁(K Kᵀ)) U = diag(β) (V - K W_{c-1}ᵀ)``, for all chunks at once, and only the state W is carried
by a loop over the N / L chunks. O(N·F·Dv + N·L·(F + Dv)) time; N = 4096 is 64 small steps.

Causal by construction. The paper defines no bidirectional form; a non-causal call reads every query from the
fast weights after the whole sequence, ``y_i = W_N φ(q_i)`` (this library's choice, so that the mixer also serves
an encoder such as a ViT; pass ``is_causal=True`` for the paper's model).

Padding (``attn_mask`` [B, N]): padded tokens write nothing (β = 0 and zero features), so they never reach a real
output. Dense masks are refused: the recurrence has no per-pair weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_int, float_tiny
from ..ops._dispatch import upcast
from ..registry import register
from ._base import TokenMixer

__all__ = ['DeltaNet', 'dpfp', 'delta_rule']


def dpfp(x: Tensor, nu: int = 1) -> Tensor:
    """Deterministic parameter-free projection ``[..., D] -> [..., 2·D·ν]`` (non-negative)."""
    r = torch.cat([F.relu(x), F.relu(-x)], dim=-1)
    rolled = torch.cat([r.roll(j, dims=-1) for j in range(1, nu + 1)], dim=-1)
    return torch.cat([r for _ in range(nu)], dim=-1) * rolled


def sum_normalize(x: Tensor) -> Tensor:
    """``x / Σ_f x_f`` over the last dim (an all-zero row stays zero)."""
    return x / x.sum(-1, keepdim=True).clamp_min(float_tiny(x.dtype))


def delta_rule(
        q: Tensor, k: Tensor, v: Tensor, beta: Tensor, chunk: int = 64, causal: bool = True,
) -> tuple[Tensor, Tensor]:
    """The delta rule over a sequence, in chunks: the outputs and the final fast weights.

    Args:
        q, k: [B, H, N, F] features (already mapped and normalised).
        v: [B, H, N, Dv].
        beta: [B, H, N] write strengths.
        chunk: chunk length L.
        causal: ``y_i = W_i q_i`` (True) or ``y_i = W_N q_i`` (False: every query reads the final weights).

    Returns:
        ``(y, state)``: y [B, H, N, Dv] and ``state = W_Nᵀ`` [B, H, F, Dv].
    """
    B, H, n, Fd = k.shape
    pad = (-n) % chunk
    if pad:  # padded steps write nothing (beta = 0)
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        beta = F.pad(beta, (0, pad))
    # [B, H, N, D] -> [B, H, C, L, D]: C chunks of length L
    q, k, v = (t.unflatten(2, (-1, chunk)) for t in (q, k, v))
    beta = beta.unflatten(2, (-1, chunk))[..., None]
    eye = torch.eye(chunk, device=k.device, dtype=k.dtype)
    system = eye + beta * (k @ k.transpose(-2, -1)).tril(-1)  # I + diag(β) tril₋₁(K Kᵀ), unit lower triangular
    # U = T (diag(β) V) - T (diag(β) K) S with T the inverse of ``system``: both products for all chunks at once
    rhs = torch.cat([beta * v, beta * k], dim=-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    u_v, u_k = solved[..., :v.shape[-1]], solved[..., v.shape[-1]:]
    scores = (q @ k.transpose(-2, -1)).tril() if causal else q.new_zeros(0)  # φ(q_t)·φ(k_s), s <= t
    state = q.new_zeros(B, H, Fd, v.shape[-1])
    outs: list[Tensor] = []
    for c in range(q.shape[2]):
        u = u_v[:, :, c] - u_k[:, :, c] @ state  # [B, H, L, Dv]
        if causal:
            outs.append(q[:, :, c] @ state + scores[:, :, c] @ u)
        state = state + k[:, :, c].transpose(-2, -1) @ u
    if not causal:
        return q.flatten(2, 3)[:, :, :n] @ state, state
    return torch.stack(outs, dim=2).flatten(2, 3)[:, :, :n], state


@register(
    'delta', paper='Linear Transformers Are Secretly Fast Weight Programmers', arxiv='2102.11174', year=2021,
    family='linear', complexity='O(N·C²/H)', kind='mixer', supports_causal=True,
)
class DeltaNet(TokenMixer):
    """Fast weights programmed by the delta rule, DPFP features (see the module docstring).

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`; ``attn_drop`` drops the outputs of the fast weights).
        nu: DPFP order ν in 1..D (the paper: 1, 2, 3); the features have 2·D·ν dims.
        chunk_size: chunk length of the computation (default 64; any value gives the same function).
        device, dtype: factory arguments.

    The write strengths come from ``beta`` (a ``Linear(dim, num_heads)``, bias as ``qkv_bias``; the paper's code
    produces q, k, v and β with one projection, split here so that ``qkv`` keeps timm's shape).

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask``: [B, N] bool key padding (True = real token).
    """

    supports_key_padding = True
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
            nu: int = 1,
            chunk_size: int = 64,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        self.nu = check_int('nu', nu, 1, dim // num_heads)
        self.chunk_size = check_int('chunk_size', chunk_size)
        self.beta = nn.Linear(dim, num_heads, bias=qkv_bias, device=device, dtype=dtype)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        kpm, _ = self.check_input(x, attn_mask, is_causal)
        q, k, v = self.split_heads(x)
        dtype = v.dtype
        fq = sum_normalize(dpfp(upcast(q), self.nu))
        fk = sum_normalize(dpfp(upcast(k), self.nu))
        vf = upcast(v)
        beta = torch.sigmoid(upcast(self.beta(x))).transpose(1, 2)  # [B, H, N]
        if kpm is not None:
            real = kpm[:, None, :].to(fk.dtype)
            fk, vf, beta = fk * real[..., None], vf * real[..., None], beta * real
        out, _ = delta_rule(fq, fk, vf, beta, self.chunk_size, is_causal)
        return self.merge_heads(self.attn_drop(out.to(dtype)))
