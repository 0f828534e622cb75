"""SOFT: softmax-free attention, a Gaussian kernel approximated through landmarks sampled from the token grid.

Paper: "SOFT: Softmax-free Transformer with Linear Complexity", Lu, Yao, Zhang, Zhu, Xu, Gao, Xiang, Zhang,
NeurIPS 2021, arXiv:2110.11945 (https://arxiv.org/abs/2110.11945). Official code: fudan-zvg/SOFT
(``models/softmax_free_transformer.py``, ``SOFT/kernel/inverse.py``).

Queries and keys are tied (W_q = W_k, as the paper), and the softmax is replaced by a Gaussian kernel, without
normalisation (per head, D channels):

    S_ij = exp(-‖q_i - q_j‖² / (2√D))                          computed as exp(-‖q̂_i - q̂_j‖² / 2), q̂ = q / D^¼
    Q̃ = GELU(LN(Conv_{s×s, stride s}(Q̂ on the H×W grid)))       m = ⌈H/s⌉·⌈W/s⌉ landmarks (the code's sampling)
    Ŝ = P A⁺ Pᵀ,   P = exp(-‖Q̂ - Q̃‖²/2) [N, m],   A = exp(-‖Q̃ - Q̃‖²/2) [m, m]
    out = P (A⁺ (Pᵀ V))                                         O(N·m·D + m³)

A⁺, the Moore-Penrose inverse of A, is approximated by the Newton-Schulz iteration of the paper,
``A_{k+1} = 2 A_k - A_k A A_k`` from ``A_0 = α A``, for ``newton_iters`` steps (default 20, the released code's
``max_iter``), with α = 1.8 / ‖A‖₁² (the released kernel's ``0.9 · 2 / max row sum²``; the paper's bound is
α < 2/σ_max(A)²; the released kernel also adds 0.01·I to A, which is not done here). The gradient is that of the
iteration as computed (autograd through the steps); the released code instead back-propagates as if the result
were the exact inverse.

Landmarks (``landmarks=``): ``'conv'`` (default) is the code's sampling, a convolution with kernel = stride = s
(``landmark_stride``, default 2: 49 landmarks on ViT-S's 14×14 grid, as SOFT's third stage), shared by the heads
on their D channels, then LayerNorm and GELU; ``'pool'`` averages the queries of each s×s cell (no parameters).
A grid that is not a multiple of s is zero-padded at the bottom and right (``'pool'`` averages the cells' tokens
only). With ``'pool'`` and s = 1 every patch token is a landmark and, without prefix tokens, Ŝ = S: the tests
check that the mixer then converges to the exact Gaussian-kernel attention ``S V``.

Cost and the landmark count: SOFT is linear in N for a fixed number of landmarks m. The paper keeps m = 49 (7×7 at
224²) in every stage by a stride per stage (8, 4, 2, 1 on the 56², 28², 14², 7² grids). A fixed stride s gives
m = ⌈H/s⌉·⌈W/s⌉ = N/s², so at one stride the cost grows as N²·C/s² and the Newton-Schulz steps as (N/s²)³: fine at
ViT sizes, cubic for long sequences. ``landmark_grid=(g_h, g_w)`` (with ``'pool'``) fixes m = g_h·g_w at any grid
instead: each landmark is the mean of the real queries of one cell of an adaptive g_h×g_w partition (the cells of
``adaptive_avg_pool2d``: rows ⌊i·H/g_h⌋ to ⌈(i+1)·H/g_h⌉), which is what the paper's per-stage strides do for the
resolution they were set for, and the cost is O(N·m·C + m³), linear in N.

``value_conv=k`` adds the released code's depthwise k×k convolution of V over the grid (one kernel per head,
shared by its channels) to the patch tokens' output; the paper does not describe it, so it is off by default.

Prefix tokens (class and register tokens) are queries and keys of the kernel like every token (their rows of P
enter both sides of ``P A⁺ Pᵀ``) but are no landmarks. Key padding is exact: padded tokens are zeroed before the
landmark sampling (the ``'pool'`` means skip them) and their rows of P are dropped from Pᵀ V. The paper gives no
causal form (the landmarks pool the whole grid); ``is_causal=True`` is refused. ``attn_drop`` drops the mixed
values.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_feat_size, check_int, check_odd
from ..registry import register
from ._base import GridMixer

__all__ = ['SoftAttention', 'gaussian_kernel', 'newton_inverse']


def gaussian_kernel(a: Tensor, b: Tensor) -> Tensor:
    """``exp(-‖a_i - b_j‖² / 2)`` for a [..., N, D], b [..., M, D] -> [..., N, M]."""
    sq = a.square().sum(-1, keepdim=True) + b.square().sum(-1)[..., None, :] - 2 * a @ b.transpose(-2, -1)
    return torch.exp(-0.5 * sq.clamp_min(0.))


def newton_inverse(a: Tensor, iterations: int = 20) -> Tensor:
    """Moore-Penrose inverse of the symmetric ``a`` [..., m, m] by ``iterations`` Newton-Schulz steps
    ``V ← 2V - V a V`` from ``V_0 = α a``, α = 1.8 / (max absolute row sum)² per matrix."""
    row = a.abs().sum(-1).amax(-1)[..., None, None]  # ‖a‖_∞ = ‖a‖_1 (a is symmetric), > 0 for a Gaussian kernel
    z = a * (1.8 / row.square())
    for _ in range(iterations):
        z = 2 * z - z @ a @ z
    return z


@register(
    'soft', paper='SOFT: Softmax-free Transformer with Linear Complexity', arxiv='2110.11945', year=2021,
    family='low-rank', complexity='O(N·m·C + m³)', kind='mixer', requires_grid=True,
)
class SoftAttention(GridMixer):
    """SOFT attention over the patch grid of a ViT (see the module docstring).

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`; queries and keys are tied, so ``qk_norm`` normalises the queries).
        feat_size: (H, W) of the patch grid (required); any grid can be given at forward.
        num_prefix_tokens: the class and register tokens before the patch tokens.
        landmark_stride: s, the cell size of the landmark sampling (default 2).
        landmarks: ``'conv'`` (default, the code's) or ``'pool'``.
        landmark_grid: (g_h, g_w) or g: a fixed landmark grid (adaptive cells, ``landmarks='pool'`` only), m fixed
            at any input size; default None: the stride decides m.
        newton_iters: Newton-Schulz steps for A⁺ (default 20).
        value_conv: odd kernel size of the code's depthwise convolution of V (default None: none).
        device, dtype: factory arguments.

    Shapes:
        x: [B, P + H·W, C] -> [B, P + H·W, C]; ``attn_mask`` [B, N] bool key padding (True = real token).

    Parameters: ``qv`` [2C, C] (W_q = W_k, then W_v), ``landmark_conv`` [D, D, s, s] and ``landmark_norm`` (for
    ``'conv'``), ``value_conv`` [h, 1, k, k], ``proj``.
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
            landmark_stride: int = 2,
            landmarks: str = 'conv',
            landmark_grid: int | tuple[int, int] | None = None,
            newton_iters: int = 20,
            value_conv: int | None = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            feat_size=feat_size, num_prefix_tokens=num_prefix_tokens, use_qkv=False, device=device, dtype=dtype)
        dd = dict(device=device, dtype=dtype)
        self.landmark_stride = check_int('landmark_stride', landmark_stride)
        if landmarks not in ('conv', 'pool'):
            raise ValueError(f"landmarks must be 'conv' or 'pool', got {landmarks!r}")
        self.landmarks = landmarks
        self.landmark_grid = None if landmark_grid is None else check_feat_size('landmark_grid', landmark_grid)
        if self.landmark_grid is not None and landmarks != 'pool':
            raise ValueError(f"landmark_grid needs landmarks='pool' (a convolution's cells are fixed by its stride), "
                             f"got landmarks={landmarks!r}")
        self.newton_iters = check_int('newton_iters', newton_iters)
        self.qv = nn.Linear(dim, 2 * dim, bias=qkv_bias, **dd)
        self.k_norm = nn.Identity()  # k = q
        D, s = self.head_dim, self.landmark_stride
        self.landmark_conv = nn.Conv2d(D, D, s, stride=s, bias=False, **dd) if landmarks == 'conv' else None
        self.landmark_norm = nn.LayerNorm(D, **dd) if landmarks == 'conv' else None
        self.value_conv = None
        if value_conv is not None:
            k = check_odd('value_conv', value_conv)
            self.value_conv = nn.Conv2d(num_heads, num_heads, k, padding=k // 2, groups=num_heads, bias=False, **dd)

    def sample_landmarks(self, q: Tensor, valid: Tensor | None, H: int, W: int) -> Tensor:
        """Landmarks [B, h, m, D] from the patch queries ``q`` [B, h, H·W, D] (padded ones zeroed) of the H×W grid,
        ``valid`` [B, H·W] (True = real token) or None."""
        B, h, _, D = q.shape
        if self.landmark_grid is not None:
            return self.grid_landmarks(q, valid, H, W, self.landmark_grid)
        s = self.landmark_stride
        Hp, Wp = -(-H // s) * s, -(-W // s) * s
        grid = F.pad(q.reshape(B * h, H, W, D).permute(0, 3, 1, 2), (0, Wp - W, 0, Hp - H))  # [B·h, D, Hp, Wp]
        if self.landmark_conv is not None and self.landmark_norm is not None:
            out = self.landmark_conv(grid.to(self.landmark_conv.weight.dtype)).flatten(2).transpose(1, 2)
            return F.gelu(self.landmark_norm(out)).to(q.dtype).reshape(B, h, (Hp // s) * (Wp // s), D)
        ones = torch.ones(B, H * W, dtype=q.dtype, device=q.device) if valid is None else valid.to(q.dtype)
        count = F.pad(ones.reshape(B, 1, H, W), (0, Wp - W, 0, Hp - H))  # [B, 1, Hp, Wp]
        count = count.reshape(B, 1, Hp // s, s, Wp // s, s).sum((3, 5)).flatten(2)  # [B, 1, m]
        total = grid.reshape(B, h, D, Hp // s, s, Wp // s, s).sum((4, 6)).flatten(3)  # [B, h, D, m]
        return (total / count[:, :, None].clamp_min(1)).transpose(-2, -1)

    @staticmethod
    def grid_landmarks(q: Tensor, valid: Tensor | None, H: int, W: int, cells: tuple[int, int]) -> Tensor:
        """Landmarks [B, h, m, D]: the mean of the real queries of each cell of an adaptive ``cells`` partition of
        the H×W grid (at most H×W cells), ``q`` [B, h, H·W, D] with padded ones zeroed."""
        B, h, _, D = q.shape
        gh, gw = min(cells[0], H), min(cells[1], W)
        grid = q.reshape(B * h, H, W, D).permute(0, 3, 1, 2)  # [B·h, D, H, W]
        mean = F.adaptive_avg_pool2d(grid, (gh, gw)).reshape(B, h, D, gh * gw)
        if valid is not None:  # a cell's mean of x·valid over its mean of valid: the mean of its real queries
            share = F.adaptive_avg_pool2d(valid.to(q.dtype).reshape(B, 1, H, W), (gh, gw)).reshape(B, 1, 1, -1)
            mean = torch.where(share > 0, mean / torch.where(share > 0, share, torch.ones_like(share)), 0.)
        return mean.transpose(-2, -1)

    def mix(
            self, x: Tensor, H: int, W: int, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        B, N, C = x.shape
        P, h, D = self.num_prefix_tokens, self.num_heads, self.head_dim
        ct = torch.promote_types(x.dtype, torch.float32)
        q, v = self.qv(x).reshape(B, N, 2, h, D).permute(2, 0, 3, 1, 4).unbind(0)  # [B, h, N, D]
        q = self.q_norm(q).to(ct) * D ** -0.25
        vf = v.to(ct)
        keep = None if key_padding_mask is None else key_padding_mask[:, None, :, None].to(ct)  # [B, 1, N, 1]
        if keep is not None:
            q_real, vf = q * keep, vf * keep
        else:
            q_real = q
        grid_valid = None if key_padding_mask is None else key_padding_mask[:, P:]
        landmarks = self.sample_landmarks(q_real[:, :, P:], grid_valid, H, W)  # [B, h, m, D]
        p = gaussian_kernel(q, landmarks)  # [B, h, N, m]
        a_inv = newton_inverse(gaussian_kernel(landmarks, landmarks), self.newton_iters)  # [B, h, m, m]
        p_keys = p if keep is None else p * keep
        out = p @ (a_inv @ (p_keys.transpose(-2, -1) @ vf))  # [B, h, N, D]
        out = self.attn_drop(out.to(x.dtype))
        if self.value_conv is not None:
            grid_v = vf[:, :, P:].to(x.dtype).permute(0, 3, 1, 2).reshape(B * D, h, H, W)
            local = self.value_conv(grid_v).reshape(B, D, h, H * W).permute(0, 2, 3, 1)  # [B, h, H·W, D]
            out = out + F.pad(local, (0, 0, P, 0))
        return self.proj_drop(self.proj(self.norm(out.transpose(1, 2).reshape(B, N, C))))
