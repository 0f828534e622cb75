"""MobileViT block: local convolutions, then transformers across the p×p patches at each pixel position of the
patch grid, folded back and fused with the input.

Paper: "MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision Transformer", Mehta, Rastegari,
ICLR 2022, arXiv:2110.02178 (https://arxiv.org/abs/2110.02178). Official code: apple/ml-cvnets
(``cvnets/modules/mobilevit_block.py``); timm: ``timm.models.mobilevit.MobileVitBlock``.

For X [B, C, H, W] (section 3.1 of the paper):

    X_L = W_1×1 SiLU(BN(Conv_n×n(X)))                              local representation, d channels
    X_U [P, N, d]: X_L unfolded into N = HW / P non-overlapping p×p patches, P = p² (``patch_size``)
    X_G(p) = Transformer(X_U(p))   for each pixel position p ∈ {1..P} of a patch: L pre-norm layers
             (multi-head softmax attention over the N patches, then an MLP), then a LayerNorm
    X_F = SiLU(BN(W_1×1 Fold(X_G)))                                back to C (``conv_proj``)
    Y = SiLU(BN(Conv_n×n([X, X_F])))                               fusion (``conv_fusion``)

Where H or W is not a multiple of p, X_L is resized bilinearly (``align_corners=False``) to the next multiples
before the unfold and the folded map resized back to H × W: that is what the official code does (and timm, which
copied it), so any H×W works, 1×1 included, and this block equals timm's there as well.

The transformer layers are timm's ViT ``Block`` (pre-norm, ``qkv_bias=True``, MLP ratio 2 with the block's
activation, as ml-cvnets' ``TransformerEncoder``), with visattn's ``FullAttention`` mixer as the attention: it
has timm ``Attention``'s parameters and runs ``F.scaled_dot_product_attention`` (timm's ``Attention`` does too,
unless its fused attention is switched off). The parameter names are timm's ``MobileVitBlock``'s (``conv_kxk``,
``conv_1x1``, ``transformer.<i>``, ``norm``, ``conv_proj``, ``conv_fusion``), so its state dict loads as it is.

Defaults: n = 3, ``patch_size=2`` (the paper's and the official models' p = 2; timm's block defaults to 8, its
models pass 2), ``transformer_depth=2``, ``num_heads=4`` (timm; ml-cvnets' configurations use 4 heads),
``mlp_ratio=2`` (ml-cvnets' ``ffn_dim = 2d``), SiLU (the paper's swish; timm's MobileViT models pass SiLU, its
standalone block defaults to ReLU), ``transformer_dim`` = C (timm's ``bottle_ratio=1``; the paper's models use
d = 1.5 C for XS and S).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ConvNormAct, get_act_layer
from timm.models.vision_transformer import Block
from torch import Tensor

from .._utils import check_channels, check_float, check_int, check_nchw, check_odd, check_prob
from ..mixers.softmax import FullAttention
from ..registry import register

__all__ = ['MobileVitBlock']


@register(
    'mobilevit', paper='MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision Transformer',
    arxiv='2110.02178', year=2022, family='local', complexity='O(N²·d/p²)',
)
class MobileVitBlock(nn.Module):
    """MobileViT block (v1).

    Args:
        channels: input channels C.
        out_channels: output channels (default C).
        kernel_size: n of the local and of the fusion convolution, odd (default 3).
        patch_size: p, the side of the patches (default 2).
        transformer_dim: d, the transformer width (default C); divisible by ``num_heads``.
        transformer_depth: L, the transformer layers (default 2).
        num_heads: attention heads (default 4).
        mlp_ratio: hidden width of the MLPs over d (default 2).
        attn_drop: dropout on the attention weights (default 0).
        drop: dropout after the attention and MLP projections (default 0).
        drop_path: stochastic depth of the transformer layers (default 0).
        no_fusion: leave out the fusion convolution (the output is X_F; default False).
        act_layer: activation of the convolutions and the MLPs (default SiLU).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, out_channels, H, W].
    """

    def __init__(
            self,
            channels: int,
            out_channels: int | None = None,
            *,
            kernel_size: int = 3,
            patch_size: int = 2,
            transformer_dim: int | None = None,
            transformer_depth: int = 2,
            num_heads: int = 4,
            mlp_ratio: float = 2.0,
            attn_drop: float = 0.,
            drop: float = 0.,
            drop_path: float = 0.,
            no_fusion: bool = False,
            act_layer: type[nn.Module] | str = nn.SiLU,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        C = self.channels = check_channels(channels)
        out = self.out_channels = check_channels(C if out_channels is None else out_channels, 'out_channels')
        check_odd('kernel_size', kernel_size)
        self.patch_size = check_int('patch_size', patch_size)
        d = self.transformer_dim = check_channels(C if transformer_dim is None else transformer_dim, 'transformer_dim')
        check_int('transformer_depth', transformer_depth)
        check_int('num_heads', num_heads)
        check_float('mlp_ratio', mlp_ratio, 0., None, low_open=True)
        for name, value in (('attn_drop', attn_drop), ('drop', drop), ('drop_path', drop_path)):
            check_prob(name, value)
        if d % num_heads:
            raise ValueError(f'num_heads must divide transformer_dim={d}, got {num_heads}')
        if int(d * mlp_ratio) < 1:
            raise ValueError(f'mlp_ratio must give an MLP of at least 1 channel (transformer_dim={d}), got {mlp_ratio}')
        act = get_act_layer(act_layer) if isinstance(act_layer, str) else act_layer
        self.conv_kxk = ConvNormAct(C, C, kernel_size, act_layer=act, **dd)
        self.conv_1x1 = nn.Conv2d(C, d, 1, bias=False, **dd)
        self.transformer = nn.Sequential(*[
            Block(
                d, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, attn_drop=attn_drop, proj_drop=drop,
                drop_path=drop_path, act_layer=act, norm_layer=nn.LayerNorm, attn_layer=FullAttention, **dd)
            for _ in range(transformer_depth)
        ])
        self.norm = nn.LayerNorm(d, **dd)
        self.conv_proj = ConvNormAct(d, out, 1, act_layer=act, **dd)
        self.conv_fusion = None if no_fusion else ConvNormAct(C + out, out, kernel_size, act_layer=act, **dd)
        self.no_fusion = no_fusion

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'MobileVitBlock')
        shortcut = x
        x = self.conv_1x1(self.conv_kxk(x))
        B, d, H, W = x.shape
        p = self.patch_size
        nh, nw = -(-H // p), -(-W // p)
        resized = nh * p != H or nw * p != W
        if resized:  # the official code's (and timm's) bilinear resize to multiples of p
            x = F.interpolate(x, size=(nh * p, nw * p), mode='bilinear', align_corners=False)
        # [B, d, nh·p, nw·p] -> [B·P, N, d]: one sequence of the N patches per pixel position (row, col) in a patch
        x = x.view(B, d, nh, p, nw, p).permute(0, 3, 5, 2, 4, 1).reshape(B * p * p, nh * nw, d)
        x = self.norm(self.transformer(x))
        x = x.view(B, p, p, nh, nw, d).permute(0, 5, 3, 1, 4, 2).reshape(B, d, nh * p, nw * p)
        if resized:
            x = F.interpolate(x, size=(H, W), mode='bilinear', align_corners=False)
        x = self.conv_proj(x)
        if self.conv_fusion is not None:
            x = self.conv_fusion(torch.cat((shortcut, x), dim=1))
        return x
