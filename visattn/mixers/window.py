"""Swin (shifted) window attention in token form, for a ViT: a grid mixer.

Paper: "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", Liu, Lin, Cao, Hu, Wei, Zhang, Lin,
Guo, ICCV 2021, arXiv:2103.14030 (https://arxiv.org/abs/2103.14030).

The patch tokens, laid out on their H×W grid, are split into M×M windows (M = ``window_size``) and attend inside
their window, as Swin's W-MSA (eq. 4), with Swin's relative position bias ``B`` read from the table
``B̂ ∈ R^{(2M-1)²×heads}`` at the offset ``(y_i - y_j, x_i - x_j)``. With ``shift_size`` s > 0 the windows are those
of the grid cut at s, s + M, ... (SW-MSA, computed as Swin's cyclic shift with its mask). A ViT's prefix tokens (class
and register tokens, ``P = num_prefix_tokens``) join as global tokens, in one softmax:

    patch i:    y_i = softmax_{j ∈ window(i) ∪ prefix}(q_i·k_j / sqrt(d) + B_ij) v_j       (B = 0 for a prefix key)
    prefix p:   y_p = softmax_{j ∈ all tokens}(q_p·k_j / sqrt(d)) v_j

then timm's ``proj``. Swin has no class token; this is the rule of the mixer contract (prefix tokens see every token,
and every patch sees them). The window piece and the prefix piece of a patch's softmax are computed apart and merged
exactly by their log-sum-exp (`visattn.mixers._sparse_utils.merge_lse`).

Any grid, from the 2-D block's functions (`visattn.layers.window`): a side not larger than M gives one window of
that side and no shift along it (Swin's rule); a side that is not a multiple of M is padded and the padded keys are
masked out (the block's default ``pad_mode='mask'``; timm's and the released code's zero tokens as keys are not
offered here: in a ViT they would be fake tokens). The table is indexed by offsets, so it does not depend on the
grid and the mixer runs at any grid given at forward. On a grid that is a multiple of the window and without prefix
tokens the mixer is timm's ``swin_transformer.WindowAttention`` on the partitioned (and, for SW-MSA, cyclically
shifted and masked) tokens, with the same state dict (``qkv``, ``proj``, ``relative_position_bias_table``; build it
with ``qkv_bias=True`` as Swin).

Masks and causality are refused (``ValueError``): a key-padding mask would have to follow the windows' padding and
shift, which no ViT use needs, and a token grid has no order in which causality would mean anything.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_int
from ..layers.window import relative_position_index, window_geometry, window_layout, window_mask
from ..registry import register
from ._base import GridMixer
from ._sparse_utils import attention_lse, merge_lse

__all__ = ['WindowGridAttention']


@register(
    'window', paper='Swin Transformer: Hierarchical Vision Transformer using Shifted Windows', arxiv='2103.14030',
    year=2021, family='sparse', complexity='O(N·M²·C)', kind='mixer', requires_grid=True,
)
class WindowGridAttention(GridMixer):
    """Swin's (shifted) window attention over the patch grid of a ViT; prefix tokens are global.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`; ``qkv`` and ``proj`` as timm's, so ViT weights load).
        feat_size: (H, W) of the patch grid (required).
        num_prefix_tokens: the class and register tokens before the patch tokens.
        window_size: side M of the windows (default 7, as Swin).
        shift_size: shift s of the windows, 0 <= s < M (default 0: W-MSA; Swin alternates 0 and M // 2).
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
            window_size: int = 7,
            shift_size: int = 0,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            feat_size=feat_size, num_prefix_tokens=num_prefix_tokens, device=device, dtype=dtype)
        self.window_size = check_int('window_size', window_size)
        self.shift_size = check_int('shift_size', shift_size, 0, window_size - 1)
        self.relative_position_bias_table = nn.Parameter(
            torch.empty((2 * window_size - 1) ** 2, num_heads, device=device, dtype=dtype))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=.02)

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, feat_size={self.feat_size}, '
                f'num_prefix_tokens={self.num_prefix_tokens}, window_size={self.window_size}, '
                f'shift_size={self.shift_size}')

    def relative_position_bias(self, wh: int, ww: int) -> Tensor:
        """B of a wh×ww window: [heads, wh·ww, wh·ww]."""
        table = self.relative_position_bias_table
        idx = relative_position_index(wh, ww, self.window_size, table.device)
        n = wh * ww
        return table[idx.view(-1)].view(n, n, -1).permute(2, 0, 1)

    def mix(self, x: Tensor, H: int, W: int, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool) -> Tensor:
        q, k, v = self.split_heads(x)  # [B, heads, P + H·W, d]
        B, heads, _, d = q.shape
        P = self.num_prefix_tokens
        wh, ww, sh, sw = window_geometry(H, W, self.window_size, self.shift_size)
        src, inv, on_map, region = window_layout(H, W, wh, ww, sh, sw, x.device)
        nw, n = on_map.shape
        # the patches of every window: [B, heads, nW, n, d]
        qw = q[:, :, P:].index_select(2, src).view(B, heads, nw, n, d)
        kw = k[:, :, P:].index_select(2, src).view(B, heads, nw, n, d)
        vw = v[:, :, P:].index_select(2, src).view(B, heads, nw, n, d)
        mask: Tensor | None = None
        if sh != 0 or sw != 0 or H % wh != 0 or W % ww != 0:
            mask = window_mask(on_map, region, True)[:, 0]  # [nW, n, n]
        dropout_p = self.attn_drop.p if self.training else 0.
        bias = self.relative_position_bias(wh, ww)[:, None]  # [heads, 1, n, n]
        parts = [attention_lse(qw, kw, vw, mask, self.scale, bias, dropout_p=dropout_p)]
        if P > 0:
            parts.append(attention_lse(qw, k[:, :, None, :P], v[:, :, None, :P], None, self.scale,
                                       dropout_p=dropout_p))
        out = merge_lse(parts).reshape(B, heads, nw * n, d).index_select(2, inv)  # [B, heads, H·W, d]
        if P > 0:
            prefix = attention_lse(q[:, :, :P], k, v, None, self.scale, dropout_p=dropout_p)[0]
            out = torch.cat([prefix, out], dim=2)
        return self.merge_heads(out)
