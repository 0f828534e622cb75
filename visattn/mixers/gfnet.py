"""GFNet's global filter in token form, for a ViT: a grid mixer.

Paper: "Global Filter Networks for Image Classification", Rao, Zhao, Zhu, Lu, Zhou, NeurIPS 2021, arXiv:2107.00645
(https://arxiv.org/abs/2107.00645).

The patch tokens, laid out on their H×W grid, get GFNet's global filter ``y = F⁻¹(K ⊙ F(x))`` per channel
(`visattn.layers.gfnet`: ``rfft2`` / ``irfft2`` with ``norm='ortho'``, the filter ``K`` stored as the released
code's ``complex_weight`` [h, w // 2 + 1, C, 2], sized for ``feat_size`` and interpolated bicubically to the
spectrum of any other grid, which is how a grid given at forward, or a ViT with ``dynamic_img_size=True``, works).
No ``qkv`` and no ``proj``, as GFNet's filter layer; ``proj_drop`` drops the output. In a timm ViT block the
mixer's output is added to the residual (``x + GF(LN(x))``, the MetaFormer form); GFNet's own block is
``x + FFN(LN(GF(LN(x))))``.

Prefix tokens (timm's class and register tokens): GFNet has none, and a filter over the grid cannot place them.
Here every prefix token gets the mean of the filtered patch tokens,

    y_prefix = mean_{h,w} F⁻¹(K ⊙ F(x))[h, w] = Re K[0, 0] ⊙ mean_{h,w} x[h, w],

the filter's zero-frequency response (the real part of its DC entry scales the mean patch token, per channel; the
``ortho`` transforms leave the mean as it is). So a class token, which the ViT's head reads, gathers the image as
the filter sees it at the lowest frequency, with a learned per-channel gain; the prefix tokens' own input is not
used (their residual carries it), and the patch tokens do not see them (the filter runs over the grid alone).

A checkpoint's ``filter.complex_weight`` of another grid size is interpolated to this mixer's when loaded (as the
released code does when it fine-tunes at a higher resolution, and as the filter is at forward), so a ViT built for
another image size loads the weights of this one.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ..layers.gfnet import GlobalFilter, resize_global_filter
from ..registry import register
from ._base import GridMixer

__all__ = ['GlobalFilterGridMixer']


@register(
    'gfnet', paper='Global Filter Networks for Image Classification', arxiv='2107.00645', year=2021,
    family='fourier', complexity='O(N·log N·C)', kind='mixer', requires_grid=True,
)
class GlobalFilterGridMixer(GridMixer):
    """GFNet's global filter over the patch grid of a ViT; prefix tokens get the mean of the filtered patch tokens.

    Args:
        dim, num_heads, ...: timm ``Attention``'s constructor (``num_heads`` must divide ``dim``; no head split is
            used).
        feat_size: (H, W) of the patch grid (required); the filter is sized for it.
        num_prefix_tokens: the class and register tokens before the patch tokens.
        device, dtype: factory arguments.

    Shapes:
        x: [B, P + H·W, C] -> [B, P + H·W, C].
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, attn_drop: float = 0., proj_drop: float = 0.,
                 norm_layer: type[nn.Module] | None = None, *, feat_size: int | tuple[int, int] | None = None,
                 num_prefix_tokens: int = 1, device=None, dtype=None) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            feat_size=feat_size, num_prefix_tokens=num_prefix_tokens, use_qkv=False, use_proj=False,
            device=device, dtype=dtype)
        self.filter = GlobalFilter(dim, feat_size=self.feat_size, device=device, dtype=dtype)

    def mix(self, x: Tensor, H: int, W: int, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool) -> Tensor:
        _, grid = self.split_prefix(x, H, W)
        grid = self.filter.forward_nhwc(grid)  # [B, H, W, C]
        mean = grid.mean(dim=[1, 2], keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))  # [B, 1, 1, C]
        prefix = mean[:, 0].to(x.dtype).expand(-1, self.num_prefix_tokens, -1)  # [B, P, C]
        return self.proj_drop(self.join_prefix(prefix, grid))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        key = prefix + 'filter.complex_weight'
        weight = state_dict.get(key)
        own = self.filter.complex_weight
        if isinstance(weight, Tensor) and weight.dim() == 4 and weight.shape[2:] == own.shape[2:] \
                and weight.shape[:2] != own.shape[:2]:
            state_dict[key] = resize_global_filter(weight, self.feat_size[0], self.feat_size[1])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
