"""PoolFormer's pooling in token form, for a ViT: a grid mixer.

Paper: "MetaFormer Is Actually What You Need for Vision", Yu, Luo, Zhou, Si, Zhou, Wang, Feng, Yan, CVPR 2022,
arXiv:2111.11418 (https://arxiv.org/abs/2111.11418).

The patch tokens, laid out on their H×W grid, get PoolFormer's ``avgpool_K(x) - x`` (`visattn.layers.poolformer`,
stride 1, borders averaged over the tokens inside the grid). PoolFormer has no class token; here each prefix token
(timm's class and register tokens) gets the global form of the same operator, the mean of all tokens minus itself,
so that a class token still gathers the image. No parameters, no projections.
"""

from __future__ import annotations

from torch import Tensor

from .._utils import check_odd
from ..layers.poolformer import pool_mix
from ..registry import register
from ._base import GridMixer

__all__ = ['PoolGridMixer']


@register(
    'poolformer', paper='MetaFormer Is Actually What You Need for Vision', arxiv='2111.11418', year=2022,
    family='token-mixing', complexity='O(N·C·K²)', kind='mixer', requires_grid=True,
)
class PoolGridMixer(GridMixer):
    """PoolFormer's pooling over the patch grid of a ViT; prefix tokens get ``mean(all tokens) - x``.

    Args:
        dim, num_heads, ...: timm ``Attention``'s constructor (``num_heads`` must divide ``dim``; no head split is
            used and no parameters are made).
        feat_size: (H, W) of the patch grid (required).
        num_prefix_tokens: the class and register tokens before the patch tokens.
        pool_size: odd size K of the pooling window (default 3).

    Shapes:
        x: [B, P + H·W, C] -> [B, P + H·W, C].
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, attn_drop: float = 0., proj_drop: float = 0.,
                 norm_layer=None, *, feat_size: int | tuple[int, int] | None = None, num_prefix_tokens: int = 1,
                 pool_size: int = 3, device=None, dtype=None) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            feat_size=feat_size, num_prefix_tokens=num_prefix_tokens, use_qkv=False, use_proj=False,
            device=device, dtype=dtype)
        self.pool_size = check_odd('pool_size', pool_size)

    def mix(self, x: Tensor, H: int, W: int, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool) -> Tensor:
        prefix, grid = self.split_prefix(x, H, W)
        grid = pool_mix(grid.permute(0, 3, 1, 2), self.pool_size).permute(0, 2, 3, 1)
        prefix = x.mean(1, keepdim=True) - prefix
        return self.proj_drop(self.join_prefix(prefix, grid))
