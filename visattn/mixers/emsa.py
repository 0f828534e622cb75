"""ResT's efficient multi-head self-attention (EMSA), in token form for a ViT: a grid mixer.

Paper: "ResT: An Efficient Transformer for Visual Recognition", Zhang, Yang, NeurIPS 2021, arXiv:2105.13677
(https://arxiv.org/abs/2105.13677); released code https://github.com/wofmanaf/ResT (``models/rest.py``).

EMSA is spatial-reduction attention (`visattn.mixers.sra`) with two changes (ResT, section 3.1 and eq. 4):

- the patch grid is reduced by a depth-wise conv of kernel s + 1, stride s and padding s // 2 (s = ``sr_ratio``),
  overlapping where PVT's kernel = stride conv does not, followed by a LayerNorm (the released code's ``sr_norm``);
- the heads interact: a 1×1 convolution across the heads of the scaled logits, then the softmax, then an instance
  normalisation of every head's attention map, to restore the diversity of the heads,

      EMSA(Q, K, V) = IN(Softmax(Conv(Q Kᵀ / sqrt(d)))) V

  with ``IN`` over the whole [queries, keys] map of each head and image (zero mean, unit variance, eps 1e-5, no
  affine: ``nn.InstanceNorm2d(heads)`` of the released code), ``Conv`` a 1×1 conv from heads to heads with bias
  (``transform_conv``). After IN the weights no longer sum to one; that is the paper's operator. The released code
  turns the transform off for one head (``apply_transform and num_heads > 1``), and so does the mixer.

Prefix tokens (a ViT's class and register tokens): as in `visattn.mixers.sra`, their queries attend like the patches'
and their own keys and values (unreduced, not normalised) join the reduced ones; the head transform and IN then run
over the whole [N, P + M] map. ResT has no class token, so this is the mixer contract's rule.

Any grid: the conv's padding s // 2 makes its output ``ceil(H / s)`` rows for even s; a side too short for an odd
s's kernel is zero-padded first. The conv does not depend on the grid.

Weights: timm's ``qkv`` / ``proj`` plus ResT's names ``sr``, ``sr_norm``, ``transform_conv``;
`visattn.mixers.sra.convert_q_kv_state_dict` maps the released code's separate ``q`` / ``kv`` Linears.

Masks and causality are refused (``ValueError``), as SRA's: a reduced key mixes several patches.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ..registry import register
from .sra import SpatialReductionAttention

__all__ = ['EfficientMultiHeadAttention']


@register(
    'emsa', paper='ResT: An Efficient Transformer for Visual Recognition', arxiv='2105.13677', year=2021,
    family='compressed', complexity='O(N²·C/s²)', kind='mixer', requires_grid=True,
)
class EfficientMultiHeadAttention(SpatialReductionAttention):
    """ResT's EMSA over the patch grid of a ViT: depth-wise strided conv reduction of the keys and values, a 1×1 conv
    across the heads of the logits, softmax, instance norm.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`; ``qkv`` and ``proj`` as timm's, so ViT weights load).
        feat_size: (H, W) of the patch grid (required).
        num_prefix_tokens: the class and register tokens before the patch tokens.
        sr_ratio: reduction s of the grid (default 2: ResT's ratio at 1/16 of the image, the grid of a ViT/16;
            1 = no reduction, then no conv and no LayerNorm, as ResT's last stage).
        apply_transform: the 1×1 conv across heads and the instance norm (default True, as every ResT model; off
            for ``num_heads=1``).
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
            sr_ratio: int = 2,
            apply_transform: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            feat_size=feat_size, num_prefix_tokens=num_prefix_tokens, sr_ratio=sr_ratio, device=device, dtype=dtype)
        self.apply_transform = bool(apply_transform) and num_heads > 1
        self.transform_conv = nn.Conv2d(num_heads, num_heads, 1, device=device, dtype=dtype) \
            if self.apply_transform else None

    def conv_geometry(self) -> tuple[int, int, int, int]:
        """ResT's depth-wise reduction: kernel s + 1, stride s, padding s // 2, one group per channel."""
        return self.sr_ratio + 1, self.sr_ratio, self.sr_ratio // 2, self.dim

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, feat_size={self.feat_size}, '
                f'num_prefix_tokens={self.num_prefix_tokens}, sr_ratio={self.sr_ratio}, '
                f'apply_transform={self.apply_transform}')

    def mix(self, x: Tensor, H: int, W: int, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool) -> Tensor:
        q, k, v = self.reduced_qkv(x, H, W)  # q [B, heads, N, d]; k, v [B, heads, P + M, d]
        ct = torch.promote_types(q.dtype, torch.float32)
        logits = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * self.scale  # [B, heads, N, P + M]
        conv = self.transform_conv
        if conv is None:
            attn = torch.softmax(logits, dim=-1)
        else:
            weight = conv.weight[:, :, 0, 0].to(ct)  # [heads out, heads in]
            logits = torch.matmul(weight, logits.flatten(2)).view(logits.shape)  # the 1×1 conv across heads
            bias = conv.bias
            if bias is not None:
                logits = logits + bias.to(ct)[:, None, None]
            attn = torch.softmax(logits, dim=-1)
            centred = attn - attn.mean(dim=(-2, -1), keepdim=True)  # instance norm of every head's map
            attn = centred * torch.rsqrt(centred.square().mean(dim=(-2, -1), keepdim=True) + 1e-5)
        attn = self.attn_drop(attn)
        return self.merge_heads(torch.matmul(attn, v.to(ct)).to(q.dtype))
