"""Ripple attention: linear attention whose key-value pairs are weighted by their spatial distance to the query.

Paper: "Ripple Attention for Visual Perception with Sub-quadratic Complexity", Zheng, Pan, Kong, ICML 2022,
arXiv:2110.02453 (https://arxiv.org/abs/2110.02453). No official code was found.

Built on kernelised (linear) attention with a feature map φ (here ``elu + 1``, as `visattn.mixers.linear`), for
the query at (i, j) of the H×W patch grid:

    out_ij = φ(q_ij)ᵀ Σ_r α_r(i, j) Σ_{(m,n) ∈ N_r(i,j)} φ(k_mn) v_mnᵀ / φ(q_ij)ᵀ Σ_r α_r(i, j) Σ_{N_r(i,j)} φ(k_mn)

The r-th vicinal group N_r(i, j) is the square ring of tokens at Chebyshev distance r from (i, j). Its spatial
weight comes from a stick-breaking transform, ``α_r = s_r Π_{r' < r} (1 - s_r')``, with proportions
``s_r(i, j) = σ(w_rᵀ x_ij + b_r)`` predicted from the query token per head (``ripple`` [h·R, C], initialised to
0 so that every s_r = ½ and α = ½, ¼, ⅛, ...). Only the first R groups (``num_rings``, the paper's r̂, default
4) get their own weight; the groups beyond r̂ - 1 contribute with one equal weight (the paper's Figure 1c), here
the rest of the stick ``ρ = Π_{r < R} (1 - s_r)`` for every token at distance >= R, so that the weights of a
query's groups sum to one (a last group that takes what is left). The sums over the rings come from a
summed-area table of ``φ(k) vᵀ`` (and of ``φ(k)``): a square of radius r is four look-ups, a ring is the
difference of two squares, so the cost is O(N·R·D²) for any grid (the paper's dynamic programming), and linear
in N.

Deviations and choices, because the paper's text could not be consulted while writing this module (see the
README): the threshold τ of the paper, which fixes r̂ from the length of the remaining stick, is replaced by the
fixed ``num_rings``; the proportions are a linear function of the query token; φ is ``elu + 1``; rings are
Chebyshev (square) rings, which the summed-area table gives in O(1).

Prefix tokens (class and register tokens) are off the grid: as queries they get plain linear attention over all
tokens (every α = 1); as keys they belong to every patch query's last group (weight ρ). Key padding is exact:
padded keys' features are zeroed before the table. Causal attention has no meaning on the 2-D rings;
``is_causal=True`` is refused. ``attn_drop`` drops the mixed values.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_int
from ..registry import register
from ._base import GridMixer

__all__ = ['RippleAttention', 'ring_weights']


def ring_weights(proportions: Tensor) -> Tensor:
    """Stick-breaking weights of R rings and the rest: ``α_r = s_r Π_{r'<r}(1 - s_r')`` for r < R and
    ``α_R = Π_{r<R}(1 - s_r)``, from ``proportions`` s [..., R] in (0, 1); returns [..., R + 1], summing to 1."""
    rest = torch.cumprod(1 - proportions, dim=-1)  # Π_{r' <= r} (1 - s_r')
    before = torch.cat([torch.ones_like(rest[..., :1]), rest[..., :-1]], dim=-1)  # Π_{r' < r}
    return torch.cat([proportions * before, rest[..., -1:]], dim=-1)


def _box_sums(table: Tensor, radius: int) -> Tensor:
    """Sums over the (2r+1)² squares centred on each cell, clipped to the grid, from the summed-area table
    ``table`` [B, h, H+1, W+1, F] (zero first row and column): [B, h, H, W, F].

    The table is extended by r copies of its first and last row (column) on each side, so that the clipped corners
    ``min(i + r + 1, H)`` and ``max(i - r, 0)`` become two plain slices, r + 1 rows apart from the ends."""
    H, W = table.shape[2] - 1, table.shape[3] - 1
    t = table
    if radius > 0:
        t = torch.cat([t[:, :, :1].expand(-1, -1, radius, -1, -1), t, t[:, :, -1:].expand(-1, -1, radius, -1, -1)], 2)
    band = t[:, :, 2 * radius + 1:2 * radius + 1 + H] - t[:, :, :H]  # [B, h, H, W+1, F]
    if radius > 0:
        band = torch.cat([band[:, :, :, :1].expand(-1, -1, -1, radius, -1), band,
                          band[:, :, :, -1:].expand(-1, -1, -1, radius, -1)], 3)
    return band[:, :, :, 2 * radius + 1:2 * radius + 1 + W] - band[:, :, :, :W]


@register(
    'ripple', paper='Ripple Attention for Visual Perception with Sub-quadratic Complexity', arxiv='2110.02453',
    year=2022, family='linear', complexity='O(N·R·C²/H)', kind='mixer', requires_grid=True,
)
class RippleAttention(GridMixer):
    """Ripple attention over the patch grid of a ViT (see the module docstring).

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`).
        feat_size: (H, W) of the patch grid (required); any grid can be given at forward (no parameter depends
            on it).
        num_prefix_tokens: the class and register tokens before the patch tokens.
        num_rings: R, the vicinal groups with their own weight (default 4).
        device, dtype: factory arguments.

    Shapes:
        x: [B, P + H·W, C] -> [B, P + H·W, C]; ``attn_mask`` [B, N] bool key padding (True = real token).

    Parameters: ``qkv`` and ``proj`` (timm ``Attention``'s), ``ripple`` [h·R, C] with bias (the stick-breaking
    proportions).
    """

    supports_key_padding = True
    eps: float = 1e-6
    __constants__ = GridMixer.__constants__ + ['eps']

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
            num_rings: int = 4,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            feat_size=feat_size, num_prefix_tokens=num_prefix_tokens, device=device, dtype=dtype)
        self.num_rings = check_int('num_rings', num_rings)
        self.ripple = nn.Linear(dim, num_heads * num_rings, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The proportions start at ½ for every ring and token."""
        if self.ripple.weight.device.type != 'meta':
            nn.init.zeros_(self.ripple.weight)
            nn.init.zeros_(self.ripple.bias)

    def mix(
            self, x: Tensor, H: int, W: int, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        B, N, C = x.shape
        P, h, R = self.num_prefix_tokens, self.num_heads, self.num_rings
        ct = torch.promote_types(x.dtype, torch.float32)
        q, k, v = self.split_heads(x)  # [B, h, N, D]
        fq, fk = F.elu(q.to(ct)) + 1, F.elu(k.to(ct)) + 1
        if key_padding_mask is not None:
            fk = fk * key_padding_mask[:, None, :, None].to(ct)
        kv = fk[..., :, None] * torch.cat([v.to(ct), torch.ones_like(v[..., :1], dtype=ct)], dim=-1)[..., None, :]
        total = kv.sum(2)  # [B, h, D, D+1]: every token, prefix tokens included
        grid = kv[:, :, P:].reshape(B, h, H, W, kv.shape[-2], kv.shape[-1]).flatten(-2)  # [B, h, H, W, D(D+1)]
        table = F.pad(grid.cumsum(2).cumsum(3), (0, 0, 1, 0, 1, 0))  # [B, h, H+1, W+1, F], zero first row/col
        alpha = ring_weights(torch.sigmoid(self.ripple(x[:, P:]).to(ct)).reshape(B, H, W, h, R))
        alpha = alpha.permute(0, 3, 1, 2, 4)  # [B, h, H, W, R+1]
        # Σ_r α_r (box_r - box_{r-1}) + α_R (total - box_{R-1}) = Σ_{r<R} (α_r - α_{r+1}) box_r + α_R total,
        # each term contracted with φ(q) first: [B, h, H, W, D+1]
        weight = alpha[..., :R] - alpha[..., 1:]
        fq_grid = fq[:, :, P:].reshape(B, h, H, W, fq.shape[-1])
        patch = alpha[..., R:] * torch.einsum('bhijd,bhde->bhije', fq_grid, total)
        for r in range(R):
            box = _box_sums(table, r).unflatten(-1, (kv.shape[-2], kv.shape[-1]))  # [B, h, H, W, D, D+1]
            patch = patch + weight[..., r:r + 1] * torch.einsum('bhijd,bhijde->bhije', fq_grid, box)
        prefix = torch.einsum('bhnd,bhde->bhne', fq[:, :, :P], total)  # [B, h, P, D+1]
        num_den = torch.cat([prefix, patch.flatten(2, 3)], dim=2)  # [B, h, N, D+1]
        num, den = num_den[..., :-1], num_den[..., -1:]
        out = torch.where(den > 0, num / den.clamp_min(self.eps), 0.)
        out = self.attn_drop(out.to(x.dtype))
        return self.proj_drop(self.proj(self.norm(out.transpose(1, 2).reshape(B, N, C))))
