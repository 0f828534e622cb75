"""Skyformer: Gaussian-kernel attention approximated by the Nyström method.

Paper: "Skyformer: Remodel Self-Attention with Gaussian Kernel and Nyström Method", Chen, Zeng, Lu, NeurIPS 2021,
arXiv:2111.00035 (https://arxiv.org/abs/2111.00035). Code: https://github.com/pkuzengqi/Skyformer.

The paper's modified ("kernelized") attention replaces ``exp(q·k/√D)`` by the Gaussian kernel
``κ(q, k) = exp(-|q - k|²/2)`` of ``x = D^{-1/4} q`` (and k), without the row normalisation:
``out = κ(Q, K) V`` (the factors ``exp(|q|²/2√D)``, ``exp(|k|²/2√D)`` that separate it from softmax are dropped).
κ(Q, K) is not a PSD matrix, so the paper's symmetrisation embeds it as the off-diagonal block of the PSD matrix
``B = κ([Q; K], [Q; K])`` (2N × 2N), and the Nyström method approximates B from d landmark rows sampled
uniformly among the 2N (half among the queries, half among the keys, as the released code):

    κ(Q, K) ≈ κ(Q, X_S) (κ(X_S, X_S) + λI)⁺ κ(X_S, K).

The pseudo-inverse is the Nyströmformer iteration (`visattn.mixers.lowrank.iterative_pinv`, 6 iterations) on the
symmetrically normalised ``Λ^{-1/2} (κ(X_S, X_S) + λI) Λ^{-1/2}`` (Λ its row sums, the released code's
preconditioning; the factors are undone afterwards, which leaves the Nyström approximation unchanged), or
``torch.linalg.pinv`` (``pinv_iterations=None``). With no ridge, the exact pseudo-inverse and all 2N rows as
landmarks (``replacement=False``, d = 2N) the approximation is exact. O(N·d·D) time and memory (d <= 2N).

Choices where the paper and the released code differ, or that are ours:
    - the released code scales q and k by ``32^{-1/4}`` (its head dim); here ``D^{-1/4}`` of the actual head dim;
    - it adds the ridge λ = 0.1 (default here too; ``ridge=None`` for none);
    - it samples landmarks with replacement afresh at every forward; here they come from ``seed`` (kept in the
      state dict, so the module is a deterministic function; ``resample_each_forward=True`` draws new ones at
      every training forward), with replacement by default (``replacement=False``: distinct rows while there are
      enough real tokens);
    - the pseudo-inverse iteration starts, as Nyströmformer's, from ``Aᵀ / (‖A‖₁ ‖A‖∞)`` (the code divides by the
      largest column sum only).

Not causal (the landmarks are drawn from the whole sequence). Padding (``attn_mask`` [B, N]) is exact: landmarks
are drawn among the real tokens only, and padded keys are left out of ``κ(X_S, K) V``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_float, check_int
from ..ops._dispatch import upcast
from ..registry import register
from ._base import TokenMixer
from ._sparse_utils import SeededMixin, hash_uniform
from .lowrank import iterative_pinv

__all__ = ['Skyformer', 'gaussian_kernel']


def gaussian_kernel(a: Tensor, b: Tensor, b_log_scale: Tensor | None = None) -> Tensor:
    """``exp(-|a_i - b_j|²/2) · s_j`` for a [..., N, D], b [..., M, D] and ``log s`` [..., M] (default s = 1):
    [..., N, M], as one product of the augmented rows ``[a, -|a|²/2, 1]·[b, 1, -|b|²/2 + log s]`` and one exp."""
    col = -b.square().sum(-1, keepdim=True) / 2
    if b_log_scale is not None:
        col = col + b_log_scale[..., None]
    a_aug = torch.cat([a, -a.square().sum(-1, keepdim=True) / 2, torch.ones_like(a[..., :1])], dim=-1)
    b_aug = torch.cat([b, torch.ones_like(b[..., :1]), col], dim=-1)
    return torch.exp(a_aug @ b_aug.transpose(-2, -1))


@register(
    'skyformer', paper='Skyformer: Remodel Self-Attention with Gaussian Kernel and Nyström Method',
    arxiv='2111.00035', year=2021, family='low-rank', complexity='O(N·d·C)', kind='mixer',
)
class Skyformer(SeededMixin, TokenMixer):
    """Nyström approximation of Gaussian-kernel attention (see the module docstring).

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`; ``attn_drop`` drops the mixed values).
        num_landmarks: d, landmark rows of ``[Q; K]`` (default 128, the released LRA configs; at most 2N are
            used).
        ridge: λ added to the landmarks' kernel matrix (default 0.1, the released code's; None: none).
        pinv_iterations: iterations of the pseudo-inverse (default 6; None: ``torch.linalg.pinv``).
        replacement: sample the landmarks with replacement (default True, the released code's).
        seed: seed of the landmarks (default None: drawn at construction; see `SeededMixin`).
        resample_each_forward: draw new landmarks at every training forward (default False).
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
            num_landmarks: int = 128,
            ridge: float | None = 0.1,
            pinv_iterations: int | None = 6,
            replacement: bool = True,
            seed: int | None = None,
            resample_each_forward: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        self.num_landmarks = check_int('num_landmarks', num_landmarks, 2)
        self.ridge = None if ridge is None else check_float('ridge', ridge, 0., low_open=True)
        self.pinv_iterations = None if pinv_iterations is None else check_int('pinv_iterations', pinv_iterations)
        self.replacement = replacement
        self.init_seed(seed)
        self.resample_each_forward = resample_each_forward

    def landmarks(self, valid: Tensor) -> Tensor:
        """Indices [B, d] into the 2N rows of ``[Q; K]``: d // 2 query rows, then the rest key rows, all real."""
        B, N = valid.shape
        d = min(self.num_landmarks, 2 * N)  # no more landmarks than rows
        halves = [d // 2, d - d // 2]
        count = valid.sum(-1, keepdim=True)  # [B, 1]
        pos = torch.arange(N, device=valid.device)
        picks: list[Tensor] = []
        for side in range(2):
            if self.replacement:  # uniform draws among the real tokens, as ranks into their sorted positions
                order = ((~valid).to(torch.int64) * N + pos).argsort(dim=-1)  # real tokens first, in order
                u = self.uniform([halves[side]], side, valid.device).expand(B, -1)
                rank = (u * count.to(u.dtype)).floor().to(torch.int64).clamp_max(N - 1)
            else:  # a random order of the real tokens, repeated if d/2 exceeds their count
                u = self.uniform([N], side, valid.device).expand(B, -1)
                order = (u + (~valid).to(u.dtype) * 2).argsort(dim=-1)
                rank = torch.arange(halves[side], device=valid.device)[None] % count.clamp_min(1)
            picks.append(order.gather(-1, rank) + side * N)
        return torch.cat(picks, dim=-1)

    def uniform(self, shape: list[int], stream: int, device: torch.device) -> Tensor:
        """Uniform draws in [0, 1), float64: from ``seed``, or fresh when resampling in training."""
        if self.resample_each_forward and self.training:
            return torch.rand(shape, device=device, dtype=torch.float64)
        return hash_uniform(self.seed, shape, stream).to(device)

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        B, H, N, D = q.shape
        dtype = v.dtype
        c = D ** -0.25
        q, k, vf = upcast(q) * c, upcast(k) * c, upcast(v)
        valid = torch.ones(B, N, dtype=torch.bool, device=q.device) if key_padding_mask is None \
            else key_padding_mask
        idx = self.landmarks(valid)  # [B, d]
        rows = torch.cat([q, k], dim=2)  # [Q; K] [B, H, 2N, D]
        marks = rows.gather(2, idx[:, None, :, None].expand(B, H, idx.shape[1], D))  # X_S [B, H, d, D]
        core = gaussian_kernel(marks, marks)  # κ(X_S, X_S) [B, H, d, d]
        if self.ridge is not None:
            core = core + self.ridge * torch.eye(core.shape[-1], device=core.device, dtype=core.dtype)
        log_scale = -0.5 * torch.log(core.sum(-1))  # Λ^{-1/2}: row sums >= 1 (the diagonal is 1)
        scale = torch.exp(log_scale)
        core = scale[..., :, None] * core * scale[..., None, :]
        if self.pinv_iterations is None:
            inv = torch.linalg.pinv(core, hermitian=True)
        else:
            inv = iterative_pinv(core, self.pinv_iterations)
        kq = gaussian_kernel(q, marks, log_scale)  # κ(Q, X_S) Λ^{-1/2} [B, H, N, d]
        kk = gaussian_kernel(k, marks, log_scale)  # κ(K, X_S) Λ^{-1/2}
        if key_padding_mask is not None:
            kk = kk * key_padding_mask[:, None, :, None].to(kk.dtype)
        out = kq @ (inv @ (kk.transpose(-2, -1) @ vf))
        return self.attn_drop(out.to(dtype))
