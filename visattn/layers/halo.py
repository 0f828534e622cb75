"""HaloNet blocked local self-attention.

Paper: "Scaling Local Self-Attention for Parameter Efficient Visual Backbones", Vaswani, Ramachandran,
Srinivas, Parmar, Hechtman, Shlens, CVPR 2021, arXiv:2103.12731 (https://arxiv.org/abs/2103.12731).

The image is split into non-overlapping b×b query blocks; every block attends to its (b + 2h)×(b + 2h) window,
the block grown by a halo of h pixels on each side. Multi-head, with 2-D relative position embeddings
factorised over height and width (the HaloNet/BoTNet form): for a query at ``(i, j)`` and a key at ``(a, b)``

    logit = (q^T k + q^T (r^h_{a-i} + r^w_{b-j})) / sqrt(d_qk)

``stride=2`` is the paper's attention downsampling: queries come from the subsampled block (every second pixel,
a (b/2)×(b/2) query block), keys and values from the full-resolution window, and the relative offsets are
measured in pixels of the input. Any H×W works: the key map is zero-padded at the bottom/right to a multiple of b
and by the halo on every side (timm's ``HaloAttn`` needs sizes divisible by b).

Borders (``pad_mode``). The paper extracts a fixed (b + 2h)×(b + 2h) memory around every block of the zero-padded
map and masks nothing (its Fig. 2: for a 4×4 image, b = 2, h = 1, every block's memory is 4×4, border blocks'
included; no attention mask appears in the method): the padded pixels are zero keys and values that take part in the
softmax, with the relative term as their logit, like the zero padding of a convolution. That is the default,
``pad_mode='zeros'`` (as timm's ``HaloAttn``, and equal to running on the map zero-padded at the bottom/right to a
multiple of b). ``pad_mode='mask'`` masks every key outside the map out of the softmax instead (as
lucidrains' ``halonet-pytorch``), so that a border query attends to image pixels only.

``compat='timm'`` is timm's ``timm.layers.HaloAttn`` on this op, at any input size: its parameter names and table
layout (``q``, ``kv``, ``pos_embed.height_rel`` / ``pos_embed.width_rel``, whose row ``offset + win - 1 + h`` holds
the key - query offset; ``load_state_dict`` takes timm's state dict as it is, ``HaloAttn.from_timm`` converts a
module), the relative term added after the scaling of ``q·k`` (``scale_pos_embed=False``), relative offsets of a
strided block in steps of the query grid, and 2×2 average pooling after a stride-1 attention where the stride does
not divide the block (timm's ``avg_down``). The attention itself is ``visattn.ops.halo_attention_2d`` (Triton
kernels on CUDA).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_channels, check_float, check_int, check_nchw, make_divisible
from ..ops import halo_attention_2d
from ..ops.halo import PAD_MODES
from ..ops.halo.naive import halo_attention_2d_naive
from ..registry import register

__all__ = ['HaloAttn']


@register(
    'halo', paper='Scaling Local Self-Attention for Parameter Efficient Visual Backbones', arxiv='2103.12731',
    year=2021, family='local', complexity='O(N·(b+2h)²·C)', backends=('torch', 'triton'),
)
class HaloAttn(nn.Module):
    """Blocked local self-attention with halos.

    Args:
        channels: input channels C.
        out_channels: output (value) channels (default C); divisible by ``num_heads``.
        num_heads: attention heads (default 8).
        dim_head: query/key width per head (default ``out_channels * qk_ratio`` rounded to 8, over the heads).
        block_size: side b of the query blocks (default 8).
        halo_size: halo h around each block (default 3).
        stride: 1, or a divisor s of b for attention downsampling (queries from every s-th pixel).
        qk_ratio: query/key width relative to ``out_channels`` when ``dim_head`` is not given (default 1).
        qkv_bias: bias in the projections (default False).
        pad_mode: ``'zeros'`` (default, the paper's: window pixels outside the map are zero keys and values in the
            softmax) or ``'mask'`` (they are masked out of it); see the module docstring.
        compat: None (default) or ``'timm'``: timm's ``HaloAttn`` (parameter layout, unscaled relative term,
            ``stride`` 1 or 2); see the module docstring.
        scale_pos_embed: scale the relative term with ``q·k`` (default: True, or False with ``compat='timm'``).
        avg_down: downsample by an s×s average pooling (ceil mode) after a stride-1 attention instead of strided
            query blocks (default False; with ``compat='timm'`` also where ``stride`` does not divide the block).
        feat_size: accepted for timm's self-attention factories; unused (any H×W works).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, out_channels, ceil(H / stride), ceil(W / stride)].
    """

    def __init__(
            self,
            channels: int,
            out_channels: int | None = None,
            *,
            num_heads: int = 8,
            dim_head: int | None = None,
            block_size: int = 8,
            halo_size: int = 3,
            stride: int = 1,
            qk_ratio: float = 1.0,
            qkv_bias: bool = False,
            pad_mode: str = 'zeros',
            compat: str | None = None,
            scale_pos_embed: bool | None = None,
            avg_down: bool = False,
            feat_size: tuple[int, int] | None = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.out_channels = check_channels(out_channels or channels, 'out_channels')
        self.num_heads = check_int('num_heads', num_heads)
        self.block_size = check_int('block_size', block_size)
        self.stride = check_int('stride', stride, 1, 2 if compat == 'timm' else None)
        self.halo_size = check_int('halo_size', halo_size, 0)
        if dim_head is not None:
            check_int('dim_head', dim_head)
        qk_ratio = check_float('qk_ratio', qk_ratio, 0., None, low_open=True)
        if pad_mode not in PAD_MODES:
            raise ValueError(f'pad_mode must be one of {PAD_MODES}, got {pad_mode!r}')
        if compat not in (None, 'timm'):
            raise ValueError(f"compat must be None or 'timm', got {compat!r}")
        if self.out_channels % num_heads:
            raise ValueError(f'out_channels={self.out_channels} must be divisible by num_heads={num_heads}')
        self.pad_mode, self.compat = pad_mode, compat
        self.avg_down = avg_down or (compat == 'timm' and block_size % stride != 0)
        if block_size % stride and not self.avg_down:
            raise ValueError(f'stride={stride} must divide block_size={block_size} (queries subsample each block), '
                             'or pass avg_down=True')
        self.scale_pos_embed = compat != 'timm' if scale_pos_embed is None else bool(scale_pos_embed)
        self.block_stride = 1 if self.avg_down else stride  # the op's stride: queries from every block_stride-th pixel
        self.win_size = block_size + 2 * halo_size
        self.dim_head_qk = dim_head or make_divisible(self.out_channels * qk_ratio, 8) // num_heads
        self.dim_head_v = self.out_channels // num_heads
        self.scale = self.dim_head_qk ** -0.5
        self.q = nn.Conv2d(channels, num_heads * self.dim_head_qk, 1, stride=self.block_stride, bias=qkv_bias, **dd)
        self.kv = nn.Conv2d(channels, num_heads * (self.dim_head_qk + self.dim_head_v), 1, bias=qkv_bias, **dd)
        tables = [nn.Parameter(torch.empty(2 * self.win_size - 1, self.dim_head_qk, **dd)) for _ in range(2)]
        if compat == 'timm':
            self.pos_embed = nn.Module()  # timm's PosEmbedRel parameter names
            self.pos_embed.height_rel, self.pos_embed.width_rel = tables
        else:
            self.rel_height, self.rel_width = tables
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True) if self.avg_down and stride > 1 else nn.Identity()
        self.reset_parameters()

    @classmethod
    def from_timm(cls, module: nn.Module) -> HaloAttn:
        """The ``compat='timm'`` block equal to a ``timm.layers.halo_attn.HaloAttn`` (its weights copied, on its device
        and dtype); unlike timm's, it runs at any H×W."""
        pooled = isinstance(module.pool, nn.AvgPool2d)
        w = module.q.weight
        m = cls(w.shape[1], module.dim_out_v, num_heads=module.num_heads, dim_head=module.dim_head_qk,
                block_size=module.block_size, halo_size=module.halo_size, stride=2 if pooled else module.block_stride,
                qkv_bias=module.q.bias is not None, compat='timm', scale_pos_embed=module.scale_pos_embed,
                avg_down=pooled, device=w.device, dtype=w.dtype)
        m.load_state_dict(module.state_dict())
        return m

    def rel_tables(self) -> tuple[Tensor, Tensor]:
        """The op's ``rel_h`` and ``rel_w`` [2·win - 1, d_qk]: row ``offset + win - 1``, divided by the scale when the
        relative term is not scaled (the op scales the whole logit). timm's tables hold the offset at row
        ``offset + win - 1 + h`` (its first 2h rows are never used): they are shifted by h."""
        if hasattr(self, 'pos_embed'):  # compat='timm' (hasattr: TorchScript compiles only the branch that exists)
            h = self.halo_size
            rel_h = F.pad(self.pos_embed.height_rel[h:], (0, 0, 0, h))
            rel_w = F.pad(self.pos_embed.width_rel[h:], (0, 0, 0, h))
        else:
            rel_h, rel_w = self.rel_height, self.rel_width
        if not self.scale_pos_embed:
            rel_h, rel_w = rel_h / self.scale, rel_w / self.scale
        return rel_h, rel_w

    def reset_parameters(self) -> None:
        """Fan-in normal projections, relative embeddings N(0, d_qk^-1)."""
        for conv in (self.q, self.kv):
            nn.init.normal_(conv.weight, std=self.channels ** -0.5)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        for table in self.parameters():
            if table.dim() == 2:  # the relative embedding tables
                nn.init.normal_(table, std=self.scale)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'HaloAttn')
        N, dq, dv = self.num_heads, self.dim_head_qk, self.dim_head_v
        # [B, N·D, H, W] -> [B, N, H, W, D]; q at every stride-th pixel: [B, N, ceil(H / s), ceil(W / s), d_qk]
        q = self.q(x).unflatten(1, (N, dq)).permute(0, 1, 3, 4, 2)
        k, v = self.kv(x).unflatten(1, (N, dq + dv)).permute(0, 1, 3, 4, 2).split([dq, dv], dim=-1)
        rel_h, rel_w = self.rel_tables()
        rel_stride = 1 if hasattr(self, 'pos_embed') else self.block_stride  # timm's offsets: query-grid steps
        rel_h, rel_w = rel_h.to(q.dtype), rel_w.to(q.dtype)
        if torch.jit.is_scripting():
            out = halo_attention_2d_naive(q, k, v, self.block_size, self.halo_size, self.block_stride, rel_h, rel_w,
                                          self.scale, self.pad_mode, rel_stride)
        else:
            out = halo_attention_2d(q, k, v, block_size=self.block_size, halo_size=self.halo_size,
                                    stride=self.block_stride, rel_h=rel_h, rel_w=rel_w, scale=self.scale,
                                    pad_mode=self.pad_mode, rel_stride=rel_stride)
        return self.pool(out.permute(0, 1, 4, 2, 3).flatten(1, 2))
