"""BoTNet's multi-head self-attention (MHSA) over the whole map with 2-D relative position logits.

Paper: "Bottleneck Transformers for Visual Recognition", Srinivas, Lin, Parmar, Shlens, Abbeel, Vaswani, CVPR 2021,
arXiv:2101.11605 (https://arxiv.org/abs/2101.11605). Reference code: the authors' gist
(https://gist.github.com/aravindsrinivas/56359b79f0ce4449bcb04ab4b56a57a2).

All-to-all attention of the N = H·W positions, per head, with the relative logits factorised over height and width
(the paper's Fig. 4, from Attention Augmented Convolutional Networks): for a query at (i, j) and a key at (a, b)

    logit = s · q^T k + s_r · q^T (r^h_{a-i} + r^w_{b-j}),        y = softmax(logit) v

with ``s = d_qk^-1/2``. The gist scales q before both terms (``s_r = s``, ``scale_pos_embed=True``, our default);
timm's ``BottleneckAttn`` adds the relative term unscaled (``s_r = 1``, its ``scale_pos_embed=False``). The tables
``r^h`` [2·Hf - 1, d_qk] and ``r^w`` [2·Wf - 1, d_qk] are shared by the heads; row ``offset + Hf - 1`` holds the key -
query offset (timm's layout and keys: ``pos_embed.height_rel`` / ``pos_embed.width_rel``).

Any input size: the tables are sized for ``feat_size`` (Hf, Wf) and indexed for the size seen; offsets beyond
±(Hf - 1) (or ±(Wf - 1)) share the outermost rows (clipped relative positions). At ``feat_size`` this is timm's
function exactly (timm's asserts H = Hf, W = Wf); smaller maps use the central rows. The attention runs as
``F.scaled_dot_product_attention`` with the relative logits as its additive float mask (the same math: one softmax
over the N keys, computed in float32 at least).

``stride=2`` is the paper's downsampling in the first block of c5: a 2×2 average pooling with stride 2 after the
attention (ceil mode, so that odd sizes give ceil(H / 2) as a strided shortcut does; timm's floors).
Defaults: ``num_heads=4`` (the paper's), query/key width ``out_channels · qk_ratio`` over the heads, no bias in the
1×1 ``qkv`` projection; initialisation as timm's (fan-in normal ``qkv``, tables N(0, d_qk^-1)).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_channels, check_float, check_int, check_nchw, make_divisible
from ..registry import register
from .lambda_layer import _pair, clipped_offsets

__all__ = ['BottleneckAttn']


@register(
    'bottleneck', paper='Bottleneck Transformers for Visual Recognition', arxiv='2101.11605', year=2021,
    family='local', complexity='O(N²·C)',
)
class BottleneckAttn(nn.Module):
    """BoTNet MHSA: global multi-head self-attention with factorised 2-D relative position logits.

    Args:
        channels: input channels C.
        out_channels: output (value) channels (default C); divisible by ``num_heads``.
        feat_size: (Hf, Wf) the relative tables are sized for (default 14×14, the first c5 block of BoT50 at 224²);
            other sizes index them with clipped offsets (see the module docstring).
        stride: 1, or 2 for the paper's 2×2 average pooling after the attention.
        num_heads: attention heads (default 4).
        dim_head: query/key width per head (default ``out_channels * qk_ratio`` rounded to 8, over the heads).
        qk_ratio: query/key width relative to ``out_channels`` when ``dim_head`` is not given (default 1).
        qkv_bias: bias in the 1×1 projection (default False).
        scale_pos_embed: scale the relative logits by d_qk^-1/2 as ``q·k`` (default True, the authors' gist; False
            is timm's).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, out_channels, ceil(H / stride), ceil(W / stride)].
    """

    def __init__(
            self,
            channels: int,
            out_channels: int | None = None,
            *,
            feat_size: int | tuple[int, int] | None = None,
            stride: int = 1,
            num_heads: int = 4,
            dim_head: int | None = None,
            qk_ratio: float = 1.0,
            qkv_bias: bool = False,
            scale_pos_embed: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.out_channels = check_channels(out_channels or channels, 'out_channels')
        self.num_heads = check_int('num_heads', num_heads)
        self.stride = check_int('stride', stride, 1, 2)
        qk_ratio = check_float('qk_ratio', qk_ratio, 0., None, low_open=True)
        if dim_head is not None:
            check_int('dim_head', dim_head)
        if self.out_channels % num_heads:
            raise ValueError(f'out_channels={self.out_channels} must be divisible by num_heads={num_heads}')
        self.feat_size = _pair(14 if feat_size is None else feat_size, 'feat_size')
        self.dim_head_qk = dim_head or make_divisible(self.out_channels * qk_ratio, 8) // num_heads
        self.dim_head_v = self.out_channels // num_heads
        self.dim_out_qk = num_heads * self.dim_head_qk
        self.scale = self.dim_head_qk ** -0.5
        self.scale_pos_embed = bool(scale_pos_embed)
        self.qkv = nn.Conv2d(channels, 2 * self.dim_out_qk + self.out_channels, 1, bias=qkv_bias, **dd)
        self.pos_embed = nn.Module()  # timm's PosEmbedRel parameter names
        self.pos_embed.height_rel = nn.Parameter(torch.empty(2 * self.feat_size[0] - 1, self.dim_head_qk, **dd))
        self.pos_embed.width_rel = nn.Parameter(torch.empty(2 * self.feat_size[1] - 1, self.dim_head_qk, **dd))
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True) if stride == 2 else nn.Identity()
        self.reset_parameters()

    @classmethod
    def from_timm(cls, module: nn.Module) -> BottleneckAttn:
        """The block equal to a ``timm.layers.BottleneckAttn`` (its weights copied, on its device and dtype); unlike
        timm's, it runs at any H×W."""
        w = module.qkv.weight
        m = cls(w.shape[1], module.dim_out_v, feat_size=(module.pos_embed.height, module.pos_embed.width),
                stride=2 if isinstance(module.pool, nn.AvgPool2d) else 1, num_heads=module.num_heads,
                dim_head=module.dim_head_qk, qkv_bias=module.qkv.bias is not None,
                scale_pos_embed=module.scale_pos_embed, device=w.device, dtype=w.dtype)
        m.load_state_dict(module.state_dict())
        return m

    def reset_parameters(self) -> None:
        """Fan-in normal projection, relative tables N(0, d_qk^-1) (timm's)."""
        nn.init.normal_(self.qkv.weight, std=self.channels ** -0.5)
        if self.qkv.bias is not None:
            nn.init.zeros_(self.qkv.bias)
        nn.init.normal_(self.pos_embed.height_rel, std=self.scale)
        nn.init.normal_(self.pos_embed.width_rel, std=self.scale)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'BottleneckAttn')
        B, _, H, W = x.shape
        heads, dqk, dv = self.num_heads, self.dim_head_qk, self.dim_head_v
        q, k, v = self.qkv(x).split([self.dim_out_qk, self.dim_out_qk, self.out_channels], dim=1)
        q = q.reshape(B, heads, dqk, H, W).permute(0, 1, 3, 4, 2)  # [B, heads, H, W, d_qk]
        k = k.reshape(B, heads, dqk, H * W).transpose(-1, -2)
        v = v.reshape(B, heads, dv, H * W).transpose(-1, -2)  # [B, heads, N, d_v]
        rel_h, rel_w = self.pos_embed.height_rel, self.pos_embed.width_rel
        qr = q * self.scale if self.scale_pos_embed else q
        # q^T r^h_{a-i} for every key row a, q^T r^w_{b-j} for every key column b: [B, heads, H, W, H] and [.., W]
        lh = (qr @ rel_h.to(q.dtype).t()).gather(
            4, clipped_offsets(H, rel_h.shape[0] // 2, x.device)[None, None, :, None].expand(B, heads, H, W, H))
        lw = (qr @ rel_w.to(q.dtype).t()).gather(
            4, clipped_offsets(W, rel_w.shape[0] // 2, x.device)[None, None, None].expand(B, heads, H, W, W))
        bias = (lh[..., :, None] + lw[..., None, :]).reshape(B, heads, H * W, H * W)
        out = F.scaled_dot_product_attention(q.reshape(B, heads, H * W, dqk), k, v, attn_mask=bias.to(q.dtype),
                                             scale=self.scale)
        return self.pool(out.transpose(-1, -2).reshape(B, self.out_channels, H, W))
