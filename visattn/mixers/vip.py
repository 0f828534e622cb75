"""Vision Permutator's weighted Permute-MLP as a grid mixer.

Paper: "Vision Permutator: A Permutable MLP-Like Architecture for Visual Recognition", Hou, Jiang, Yuan, Cheng,
Yan, Feng, IEEE TPAMI 2022, arXiv:2106.12368 (https://arxiv.org/abs/2106.12368). Released code:
https://github.com/houqb/VisionPermutator (``WeightedPermuteMLP``).

The patch tokens X ∈ R^{H×W×C} go through three branches. Split the channels into G = ``segment_dim`` groups of
S = C/G consecutive channels (channel c = g·S + s):

- height: for every column w and group g, one FC over the H·S values ``X[:, w, g·S:(g+1)·S]`` (the height swapped
  with the group index, then a linear map over the new "channels", and back): ``X_H``;
- width: likewise over the W·S values ``X[h, :, g·S:(g+1)·S]`` of every row h and group g: ``X_W``;
- channel: an FC over the C channels of each token: ``X_C``.

They are summed with split-attention weights per channel, ``a = softmax_branches(MLP(mean_{h,w}(X_H + X_W +
X_C)))`` (MLP ``C -> C/4 -> 3C`` with GELU, its output read as [C, 3]), ``Y = proj(a_H ⊙ X_H + a_W ⊙ X_W + a_C ⊙
X_C)``. The released code's FCs are C×C, which needs H = W = G; here the height FC is (H·S)×(H·S) and the width FC
(W·S)×(W·S), the released layer itself when H = W = ``segment_dim`` (its weights then load unchanged: ``mlp_h``,
``mlp_w``, ``mlp_c``, ``reweight.fc1/fc2``, ``proj``). The paper describes the split differently (C/H segments of
H consecutive channels, the height swapped with the position inside a segment); this follows the released code.
The block around it (ViP's ``skip_lam`` residual scaling) is the ViT block's business and not included.

Cost: the height FC runs W·G times on H·S values, W·G·(H·S)² = N·H·C²/G multiply-adds (the width FC likewise
N·W·C²/G), so O(N·(H + W)·C²/G): N^1.5 for a fixed G on a square grid. The paper sets G = H = W (then H·S = C and
each FC is C×C, O(N·C²)), which ties the segment count to the grid.

The FCs are sized by the grid: the mixer mixes only the H×W grid it was built for (``grid_fixed``) and raises a
``ValueError`` for another one (a ViT with ``dynamic_img_size`` cannot change its image size).

Prefix tokens (timm's class and register tokens; ViP has none): the patch tokens neither see them nor are changed
by them (their output is ViP's on the grid alone); a prefix token p gets the same mixture with the grid means of
the height and width branches in place of its own, ``proj(a_H ⊙ mean(X_H) + a_W ⊙ mean(X_W) + a_C ⊙ FC_C(p))``, so
that a class token gathers the image. No masks, no causality (every branch mixes a whole row or column).
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn as nn
from timm.layers import Mlp
from torch import Tensor

from .._utils import check_int
from ..ops._dispatch import upcast
from ..registry import register
from ._base import GridMixer

__all__ = ['WeightedPermuteMLP']


@register(
    'vip', paper='Vision Permutator: A Permutable MLP-Like Architecture for Visual Recognition', arxiv='2106.12368',
    year=2022, family='mlp', complexity='O(N·(H + W)·C²/G)', kind='mixer', requires_grid=True,
)
class WeightedPermuteMLP(GridMixer):
    """ViP's weighted Permute-MLP on the patch grid: height, width and channel FCs, reweighted per channel.

    Args:
        dim, num_heads, ...: timm ``Attention``'s constructor (``num_heads`` must divide ``dim``; no heads and no
            ``qkv`` are used). ``qkv_bias`` is the bias of the three branch FCs (the released code's use of it),
            ``proj_bias`` that of ``proj``; ``attn_drop`` is unused (as in the released code), ``proj_drop`` follows
            ``proj``.
        feat_size: (H, W) of the patch grid (required); the only grid the mixer takes.
        num_prefix_tokens: the class and register tokens before the patch tokens.
        segment_dim: G, the number of channel groups; divides ``dim`` (default: the largest divisor of ``dim`` up to
            16, i.e. 16 for the usual widths: the released ViP-S/14's, and that of the later stages of every released
            ViP; 8 is the default of the released class).
        device, dtype: factory arguments.

    Shapes:
        x: [B, P + H·W, C] -> [B, P + H·W, C].
    """

    grid_fixed: ClassVar[bool] = True  # parameters sized by the grid: no other grid at forward

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
            segment_dim: int | None = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            feat_size=feat_size, num_prefix_tokens=num_prefix_tokens, use_qkv=False, device=device, dtype=dtype)
        dd = dict(device=device, dtype=dtype)
        if segment_dim is None:
            segment_dim = max(g for g in range(1, min(16, dim) + 1) if dim % g == 0)
        self.segment_dim = check_int('segment_dim', segment_dim, 1, dim)
        if dim % segment_dim:
            raise ValueError(f'segment_dim must divide dim={dim}, got segment_dim={segment_dim!r}')
        H, W = self.feat_size
        S = dim // segment_dim
        self.mlp_c = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.mlp_h = nn.Linear(H * S, H * S, bias=qkv_bias, **dd)
        self.mlp_w = nn.Linear(W * S, W * S, bias=qkv_bias, **dd)
        self.reweight = Mlp(dim, max(1, dim // 4), 3 * dim, act_layer=nn.GELU, **dd)

    def mix(
            self, x: Tensor, H: int, W: int, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        fh, fw = self.feat_size
        if H != fh or W != fw:
            raise ValueError(
                f'{self.mixer_name} was built for the {fh}x{fw} grid (its height and width FCs are sized by it) and '
                f'cannot mix a {H}x{W} grid; build it with feat_size=({H}, {W})')
        B, C, G = x.shape[0], self.dim, self.segment_dim
        S = C // G
        prefix, grid = self.split_prefix(x, H, W)  # [B, P, C], [B, H, W, C]
        groups = grid.reshape(B, H, W, G, S)
        h = self.mlp_h(groups.permute(0, 3, 2, 1, 4).reshape(B, G, W, H * S))  # FC over (h, s) per (g, w)
        h = h.reshape(B, G, W, H, S).permute(0, 3, 2, 1, 4).reshape(B, H, W, C)
        w = self.mlp_w(groups.permute(0, 1, 3, 2, 4).reshape(B, H, G, W * S))  # FC over (w, s) per (h, g)
        w = w.reshape(B, H, G, W, S).permute(0, 1, 3, 2, 4).reshape(B, H, W, C)
        h, w, c = upcast(h), upcast(w), upcast(self.mlp_c(grid))
        h_mean, w_mean = h.mean([1, 2]), w.mean([1, 2])  # [B, C]
        summary = h_mean + w_mean + c.mean([1, 2])
        a = upcast(self.reweight(summary.to(x.dtype))).reshape(B, C, 3).softmax(-1)  # [B, C, branch]
        a_h, a_w, a_c = a[..., 0], a[..., 1], a[..., 2]
        out = h * a_h[:, None, None] + w * a_w[:, None, None] + c * a_c[:, None, None]
        out_prefix = (h_mean * a_h + w_mean * a_w)[:, None] + upcast(self.mlp_c(prefix)) * a_c[:, None]
        return self.proj_drop(self.proj(self.join_prefix(out_prefix, out).to(x.dtype)))
