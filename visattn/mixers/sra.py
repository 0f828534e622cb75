"""PVT's spatial-reduction attention (SRA) and PVT v2's linear SRA, in token form for a ViT: a grid mixer.

Papers: "Pyramid Vision Transformer: A Versatile Backbone for Dense Prediction without Convolutions", Wang, Xie, Li,
Fan, Song, Liang, Lu, Luo, Shao, ICCV 2021, arXiv:2102.12122 (https://arxiv.org/abs/2102.12122); "PVT v2: Improved
Baselines with Pyramid Vision Transformer", Wang, Xie, Li, Fan, Song, Liang, Lu, Luo, Shao, CVMJ 2022,
arXiv:2106.13797 (https://arxiv.org/abs/2106.13797).

The queries are those of every token; the keys and values come from the patch grid reduced by R = ``sr_ratio``
(PVT, eq. 3-4):

    SR(x) = Norm(Reshape(x, R) W_S)                  a conv with kernel = stride = R over the H×W grid, LayerNorm
    SRA(Q, K, V) = softmax(Q (SR(K) W_K)ᵀ / sqrt(d)) SR(V) W_V          per head, then ``proj``

so the attention costs O(N·N/R²). ``linear=True`` is PVT v2's linear SRA: the grid is average-pooled to a fixed
``pool_size``² (7×7, PVT v2's), then a 1×1 conv, LayerNorm and GELU, so the cost is O(N·pool_size²) at any grid.
With ``sr_ratio=1`` (and not ``linear``) the keys are the tokens themselves: plain multi-head attention (timm's
``Attention``, visattn's ``full``).

Prefix tokens (a ViT's class and register tokens, ``P = num_prefix_tokens``): their queries attend like the patches'
and their own keys and values (unreduced, not normalised: as every token at ``sr_ratio=1``) join the reduced ones,
so every query attends to ``P + N/R²`` keys. PVT v1 has its class token only in the last stage, where R = 1, and
PVT v2 has none, so neither paper says what a reduced stage does with one; this is the mixer contract's rule.

Grids. The reduction conv (no padding, as PVT) drops the last rows / columns of a grid whose side is not a multiple
of R, as PVT's released code and timm do; a side shorter than R (where their conv would fail) is zero-padded to R
first. The conv does not depend on the grid, so the mixer runs at any grid given at forward.

Weights. The parameters are timm's ``Attention`` (``qkv``, ``proj``) plus ``sr`` (the conv) and ``sr_norm`` (its
LayerNorm; ``norm`` is taken by timm's ``scale_norm``). timm's ``timm.models.pvt_v2.Attention`` and the released PVT
code keep separate ``q`` and ``kv`` Linears and call the LayerNorm ``norm``: `convert_q_kv_state_dict` maps their
state dict (``qkv`` rows = ``[q; kv]``, ``norm`` -> ``sr_norm``); with it, and without prefix tokens, the mixer is
timm's module (``qkv_bias=True`` as PVT v2).

Masks and causality are refused (``ValueError``): a reduced key mixes R×R patches, so hiding a single token has no
meaning for it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_int
from ..registry import register
from ._base import GridMixer, softmax_attention

__all__ = ['SpatialReductionAttention', 'convert_q_kv_state_dict']


def convert_q_kv_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict with separate ``q`` and ``kv`` Linears (timm's ``pvt_v2.Attention``, PVT's and ResT's released
    attention) in the mixers' layout: ``qkv.weight = cat([q.weight, kv.weight])`` (likewise the biases) and the
    reduction's LayerNorm ``norm.*`` renamed ``sr_norm.*``; every other key as it is."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith('q.'):
            out['qkv.' + key[2:]] = torch.cat([value, state_dict['kv.' + key[2:]]])
        elif key.startswith('norm.'):
            out['sr_norm.' + key[5:]] = value
        elif not key.startswith('kv.'):
            out[key] = value
    return out


@register(
    'sra', paper='Pyramid Vision Transformer: A Versatile Backbone for Dense Prediction without Convolutions',
    arxiv='2102.12122', year=2021, family='compressed', complexity='O(N²·C/R²)', kind='mixer', requires_grid=True,
)
class SpatialReductionAttention(GridMixer):
    """PVT's spatial-reduction attention over the patch grid of a ViT (PVT v2's linear SRA with ``linear=True``).

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`; ``qkv`` and ``proj`` as timm's, so ViT weights load).
        feat_size: (H, W) of the patch grid (required).
        num_prefix_tokens: the class and register tokens before the patch tokens.
        sr_ratio: reduction R of the grid for the keys and values (default 2: PVT's ratio at 1/16 of the image, the
            grid of a ViT/16; 1 = no reduction).
        linear: PVT v2's linear SRA: average-pool to ``pool_size``², 1×1 conv, LayerNorm, GELU (``sr_ratio`` unused).
        pool_size: side of the pooled grid of ``linear`` (default 7, PVT v2's).
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
            linear: bool = False,
            pool_size: int = 7,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            feat_size=feat_size, num_prefix_tokens=num_prefix_tokens, device=device, dtype=dtype)
        self.sr_ratio = check_int('sr_ratio', sr_ratio)
        self.pool_size = check_int('pool_size', pool_size)
        self.linear = bool(linear)
        self.sr_kernel, self.sr_padding = 1, 0
        if self.linear or sr_ratio > 1:
            kernel, stride, self.sr_padding, groups = self.conv_geometry()
            self.sr_kernel = kernel
            self.sr = nn.Conv2d(dim, dim, kernel, stride=stride, padding=self.sr_padding, groups=groups,
                                device=device, dtype=dtype)
            self.sr_norm = nn.LayerNorm(dim, device=device, dtype=dtype)
        else:
            self.sr = None
            self.sr_norm = None

    def conv_geometry(self) -> tuple[int, int, int, int]:
        """``(kernel, stride, padding, groups)`` of the reduction conv: PVT's kernel = stride = R, no padding, dense
        over the channels (``linear``: a 1×1 conv after the pool)."""
        if self.linear:
            return 1, 1, 0, 1
        return self.sr_ratio, self.sr_ratio, 0, 1

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, feat_size={self.feat_size}, '
                f'num_prefix_tokens={self.num_prefix_tokens}, sr_ratio={self.sr_ratio}, linear={self.linear}')

    def reduce(self, grid: Tensor) -> Tensor:
        """The reduced patch tokens of ``grid`` [B, C, H, W]: [B, M, C] (before the key/value projection)."""
        if self.sr is None or self.sr_norm is None:
            return grid.flatten(2).transpose(1, 2)
        if self.linear:
            grid = F.adaptive_avg_pool2d(grid, self.pool_size)
        else:
            low = self.sr_kernel - 2 * self.sr_padding  # the conv needs H + 2·padding >= kernel
            pad_h, pad_w = max(low - grid.shape[2], 0), max(low - grid.shape[3], 0)
            if pad_h > 0 or pad_w > 0:
                grid = F.pad(grid, (0, pad_w, 0, pad_h))
        t = self.sr_norm(self.sr(grid).flatten(2).transpose(1, 2))
        return F.gelu(t) if self.linear else t

    def reduced_qkv(self, x: Tensor, H: int, W: int) -> tuple[Tensor, Tensor, Tensor]:
        """``q`` of every token [B, heads, N, d]; ``k``, ``v`` [B, heads, P + M, d] of the prefix tokens and of the M
        reduced patch tokens, all through ``qkv`` (its first C rows make q, the others k and v)."""
        B, N, C = x.shape
        P = self.num_prefix_tokens
        qkv = self.qkv
        assert qkv is not None  # built (use_qkv=True); refines Optional for TorchScript
        weight, bias = qkv.weight, qkv.bias
        q = F.linear(x, weight[:C], None if bias is None else bias[:C])
        q = q.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        grid = x[:, P:].transpose(1, 2).reshape(B, C, H, W)
        source = torch.cat([x[:, :P], self.reduce(grid)], dim=1)  # [B, P + M, C]
        kv = F.linear(source, weight[C:], None if bias is None else bias[C:])
        k, v = kv.reshape(B, source.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def mix(self, x: Tensor, H: int, W: int, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool) -> Tensor:
        q, k, v = self.reduced_qkv(x, H, W)
        dropout_p = self.attn_drop.p if self.training else 0.
        return self.merge_heads(softmax_attention(q, k, v, dropout_p=dropout_p, scale=self.scale))
