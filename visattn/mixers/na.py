"""Neighbourhood attention (NAT / DiNAT) in token form, for a ViT: a grid mixer.

Papers: "Neighborhood Attention Transformer", Hassani, Walton, Li, Li, Shi, CVPR 2023, arXiv:2204.07143
(https://arxiv.org/abs/2204.07143); "Dilated Neighborhood Attention Transformer", Hassani, Shi, 2022,
arXiv:2209.15001 (https://arxiv.org/abs/2209.15001).

The patch tokens, laid out on their H×W grid, attend as NAT's layer (`visattn.layers.na`): with ``q, k, v`` from
timm's ``qkv`` Linear split into heads of width d, every patch ``i`` attends to the k×k neighbourhood ``ρ(i)`` of
patches (every ``dilation``-th one; NATTEN's borders: the window shifts inwards at the borders so that it always
holds k×k keys, see ``visattn.ops.neighborhood_attention_2d``), with NAT's relative position bias ``B`` indexed by
the offset in window steps. A ViT's prefix tokens (class and register tokens, ``P = num_prefix_tokens``) join as
global tokens, in one softmax:

    patch i:    y_i = softmax_{j ∈ ρ(i) ∪ prefix}(s · q_i·k_j + B[j - i]) v_j       (B = 0 for a prefix key)
    prefix p:   y_p = softmax_{j ∈ all tokens}(s · q_p·k_j) v_j

then timm's ``proj``. NAT has no class token; this is the rule of the mixer contract (prefix tokens see every token,
and every patch sees them). The bias table ``rpb`` [heads, 2k-1, 2k-1] is NAT's (trunc-normal init, std 0.02): it
is indexed by offsets, so it does not depend on the grid and the mixer runs at any grid given at forward.

Grids smaller than the window (``H < k·dilation`` or ``W < k·dilation``): a patch attends to the patches of its
window on the grid padded to ``k·dilation`` per side, the padded keys left out (the 2-D block's ``pad_mode='mask'``):
along a short axis, to every patch of its residue class ``i mod dilation``. NAT's released code zero-pads instead
(the block's default ``'zeros'``); in a ViT a padded key would be a fake token, so the mixer masks.

Computation. On CUDA with Triton, without prefix tokens, on a grid of at least ``k·dilation`` per side and without
attention dropout, the patches go to the fused op ``visattn.ops.neighborhood_attention_2d`` (its Triton kernels).
Everywhere else (prefix tokens, small grids, attention dropout in training, TorchScript, the CPU, where the op's
PyTorch path gathers one key per query and window offset and is slow) the PyTorch path: the patch queries in tiles of
8×8, each tile against the band of keys that holds all its windows (``(8 + (k-1)·dilation)²`` keys, masked to each
query's window, the bias gathered per pair: batched matmuls, memory O(N·(8 + (k-1)·dilation)²) per head) and against
the prefix keys, the two pieces merged exactly by their log-sum-exp (`visattn.mixers._sparse_utils.merge_lse`; the op
returns none, so it cannot take prefix keys into its softmax).

Masks and causality are refused (``ValueError``): the fused op takes no key mask, and a token grid has no order in
which causality would mean anything.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_int, check_odd
from ..layers.na import _window_rows
from ..ops import neighborhood_attention_2d
from ..ops._dispatch import triton_available
from ..registry import register
from ._base import GridMixer
from ._sparse_utils import attention_lse, merge_lse

__all__ = ['NeighborhoodGridAttention', 'axis_tiles']


TILE = 8  # default query tile side of the PyTorch path (`NeighborhoodGridAttention.tile`)


def axis_tiles(length: int, kernel_size: int, dilation: int, tile: int,
               device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Along one axis of ``length`` positions: the queries cut into tiles of ``tile`` consecutive positions (the last
    one running past the axis), and for every tile the band of ``span`` consecutive key positions that holds the
    windows of all its queries (NATTEN's windows on the axis padded to ``L' = max(length, k·dilation)``).

    Every window of a tile fits in ``span = min(L', max(tile + (k-1)·dilation, k·dilation))`` positions from
    ``start = clamp(first query - (k//2)·dilation, 0, L' - span)``: a window starts at or after ``i - (k//2)·d``
    unless the far border moved it back, and then not before ``L' - k·d``; it ends at or before ``i + (k//2)·d``
    unless the near border moved it on, and then not after ``k·d - 1``.

    Returns:
        keys: [nT, span] key positions of every tile, clamped into the axis (a clamped one is never ``inside``).
        inside: [nT, tile, span] bool, key s of the tile is in the window of its query q and on the axis.
        row: [nT, tile, span] bias row ``(key - query) / dilation + k - 1``, clamped to the table (exact where inside).
    """
    padded = max(length, kernel_size * dilation)
    span = min(padded, max(tile + (kernel_size - 1) * dilation, kernel_size * dilation))
    nt = -(-length // tile)
    i = torch.arange(nt * tile, device=device).view(nt, tile)  # query positions
    start = (i[:, 0] - (kernel_size // 2) * dilation).clamp(0, padded - span)
    j = start[:, None] + torch.arange(span, device=device)  # [nT, span]
    window = _window_rows(padded, kernel_size, dilation, device)[i.clamp(max=padded - 1)]  # [nT, tile, k]
    inside = (window[:, :, :, None] == j[:, None, None, :]).any(2) & (j < length)[:, None, :]
    row = torch.div(j[:, None, :] - i[:, :, None], dilation, rounding_mode='floor') + kernel_size - 1
    return j.clamp(max=length - 1), inside, row.clamp(0, 2 * kernel_size - 2)


def _tiles(t: Tensor, prefix: int, height: int, width: int, rows: Tensor, cols: Tensor) -> Tensor:
    """The patch tokens of ``t`` [B, heads, P + H·W, d] at the grid positions ``rows`` [nY, a] × ``cols`` [nX, b]:
    [B, heads, nY·nX, a·b, d] (two ``index_select`` and one copy: cheaper than one advanced index)."""
    B, heads, d = t.shape[0], t.shape[1], t.shape[3]
    ny, a, nx, b = rows.shape[0], rows.shape[1], cols.shape[0], cols.shape[1]
    grid = t[:, :, prefix:].reshape(B, heads, height, width, d)
    g = grid.index_select(2, rows.reshape(-1)).index_select(3, cols.reshape(-1))  # [B, heads, nY·a, nX·b, d]
    g = g.view(B, heads, ny, a, nx, b, d).permute(0, 1, 2, 4, 3, 5, 6)
    return g.reshape(B, heads, ny * nx, a * b, d)


@register(
    'na', paper='Neighborhood Attention Transformer', arxiv='2204.07143', year=2022, family='sparse',
    complexity='O(N·k²·C)', kind='mixer', backends=('torch', 'triton'), requires_grid=True,
)
class NeighborhoodGridAttention(GridMixer):
    """NAT's k×k neighbourhood attention (DiNAT's with ``dilation > 1``) over the patch grid of a ViT; prefix tokens
    are global (they see every token, every patch sees them).

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`; ``qkv`` and ``proj`` as timm's, so ViT weights load).
        feat_size: (H, W) of the patch grid (required).
        num_prefix_tokens: the class and register tokens before the patch tokens.
        kernel_size: odd window size k (default 7, NAT's and DiNAT's).
        dilation: step between window positions (default 1: NAT; DiNAT alternates 1 and a larger one).
        rel_pos_bias: learn NAT's relative position bias ``rpb`` [heads, 2k-1, 2k-1] (default True).
        device, dtype: factory arguments.

    Shapes:
        x: [B, P + H·W, C] -> [B, P + H·W, C].
    """

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
            dilation: int = 1,
            rel_pos_bias: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            feat_size=feat_size, num_prefix_tokens=num_prefix_tokens, device=device, dtype=dtype)
        self.kernel_size = check_odd('kernel_size', kernel_size)
        self.dilation = check_int('dilation', dilation)
        if rel_pos_bias:
            size = 2 * kernel_size - 1
            self.rpb = nn.Parameter(torch.zeros(num_heads, size, size, device=device, dtype=dtype))
            nn.init.trunc_normal_(self.rpb, std=0.02, a=-2., b=2.)
        else:
            self.register_parameter('rpb', None)
        self.tile = TILE  # query tile side of the PyTorch path (any value gives the same function)

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, feat_size={self.feat_size}, '
                f'num_prefix_tokens={self.num_prefix_tokens}, kernel_size={self.kernel_size}, '
                f'dilation={self.dilation}, rel_pos_bias={self.rpb is not None}')

    def tiled_attention(self, q: Tensor, k: Tensor, v: Tensor, H: int, W: int, dropout_p: float) -> Tensor:
        """The PyTorch path: the patch queries in ``tile``×``tile`` tiles, each against the band of keys that holds
        its windows (masked to the windows, the bias gathered per pair) and against the prefix keys, the two merged
        by their log-sum-exp; the prefix queries against every key. ``q, k, v``: [B, heads, P + H·W, d]; returns
        [B, heads, P + H·W, d]. Memory O(N·(tile + (k-1)·dilation)²) per head."""
        B, heads, _, d = q.shape
        P, ks, dil = self.num_prefix_tokens, self.kernel_size, self.dilation
        ty, tx = min(self.tile, H), min(self.tile, W)
        key_y, inside_y, row_y = axis_tiles(H, ks, dil, ty, q.device)  # [nY, sy], [nY, ty, sy]
        key_x, inside_x, row_x = axis_tiles(W, ks, dil, tx, q.device)
        ny, sy, nx, sx = key_y.shape[0], key_y.shape[1], key_x.shape[0], key_x.shape[1]
        qy = torch.arange(ny * ty, device=q.device).clamp(max=H - 1).view(ny, ty)
        qx = torch.arange(nx * tx, device=q.device).clamp(max=W - 1).view(nx, tx)

        qt, kt, vt = _tiles(q, P, H, W, qy, qx), _tiles(k, P, H, W, key_y, key_x), _tiles(v, P, H, W, key_y, key_x)
        # [nY, nX, ty, tx, sy, sx] -> [nY·nX, ty·tx, sy·sx]
        mask = (inside_y[:, None, :, None, :, None] & inside_x[None, :, None, :, None, :]).reshape(
            ny * nx, ty * tx, sy * sx)
        bias: Tensor | None = None
        rpb = self.rpb
        if rpb is not None:
            size = 2 * ks - 1
            # the table row of every pair: [nY, nX, ty, tx, sy, sx]
            flat = row_y[:, None, :, None, :, None] * size + row_x[None, :, None, :, None, :]
            # one gathered row of ``heads`` biases per pair, read as [heads, nT, tq, tk] (a view)
            bias = F.embedding(flat.reshape(ny * nx, ty * tx, sy * sx), rpb.reshape(heads, size * size).t())
            bias = bias.permute(3, 0, 1, 2)
        parts = [attention_lse(qt, kt, vt, mask, self.scale, bias, dropout_p=dropout_p)]
        if P > 0:
            parts.append(attention_lse(qt, k[:, :, None, :P], v[:, :, None, :P], None, self.scale,
                                       dropout_p=dropout_p))
        out = merge_lse(parts).view(B, heads, ny, nx, ty, tx, d).permute(0, 1, 2, 4, 3, 5, 6)
        out = out.reshape(B, heads, ny * ty, nx * tx, d)[:, :, :H, :W].reshape(B, heads, H * W, d)
        if P > 0:
            prefix = attention_lse(q[:, :, :P], k, v, None, self.scale, dropout_p=dropout_p)[0]
            out = torch.cat([prefix, out], dim=2)
        return out

    def fused_attention(self, q: Tensor, k: Tensor, v: Tensor, H: int, W: int) -> Tensor:
        """The patches through ``visattn.ops.neighborhood_attention_2d`` (no prefix tokens, a grid of at least
        ``k·dilation`` per side): [B, heads, H·W, d] -> [B, heads, H·W, d]."""
        B, heads, N, d = q.shape
        rpb = self.rpb
        out = neighborhood_attention_2d(
            q.reshape(B, heads, H, W, d), k.reshape(B, heads, H, W, d), v.reshape(B, heads, H, W, d),
            kernel_size=self.kernel_size, dilation=self.dilation, rpb=None if rpb is None else rpb.to(q.dtype),
            scale=self.scale)
        return out.reshape(B, heads, N, d)

    def mix(self, x: Tensor, H: int, W: int, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool) -> Tensor:
        q, k, v = self.split_heads(x)  # [B, heads, N, d]
        size = self.kernel_size * self.dilation
        dropout_p = self.attn_drop.p if self.training else 0.
        if not torch.jit.is_scripting():
            if q.is_cuda and self.num_prefix_tokens == 0 and H >= size and W >= size and dropout_p == 0. \
                    and triton_available():
                return self.merge_heads(self.fused_attention(q, k, v, H, W))
        return self.merge_heads(self.tiled_attention(q, k, v, H, W, dropout_p))
