"""Stand-Alone Self-Attention (SASA): local k×k self-attention that replaces a spatial convolution.

Paper: "Stand-Alone Self-Attention in Vision Models", Ramachandran, Parmar, Vaswani, Bello, Levskaya, Shlens,
NeurIPS 2019, arXiv:1906.05909 (https://arxiv.org/abs/1906.05909).

For every pixel ``ij`` the memory block is the k×k neighbourhood ``N_k(i, j)`` centred on it (k = 7 by default),
and with ``q = W_Q x_ij``, ``k_ab = W_K x_ab``, ``v_ab = W_V x_ab`` (eq. 3 of the paper):

    y_ij = Σ_{ab ∈ N_k(i, j)} softmax_ab(q_ij^T k_ab + q_ij^T r_{a-i, b-j}) v_ab

``r_{a-i, b-j}`` concatenates a row-offset embedding ``r_{a-i}`` and a column-offset embedding ``r_{b-j}`` of
``d_out / 2`` channels each; like q, k and v it is split into the N heads along channels (head n sees channels
``n·d_out/N ... (n+1)·d_out/N`` of q, k, v and r). The paper's logits are not scaled (``scale=1``). At the borders
the neighbourhood is zero-padded and the padded keys are masked out of the softmax. ``stride=2`` applies the
paper's 2×2 average pooling after the attention layer.

`SasaStem` is the attention of the paper's attention stem (section 3.2): attention inside each 4×4 block of the
image with spatially-aware values ``v_ab = Σ_m softmax_m((emb_row(a) + emb_col(b))^T ν^m) W_V^m x_ab`` (a, b: position
inside the block; unscaled ``q·k`` logits, no relative term); the backbones follow it with batch norm and a 4×4
max pool, as the paper does.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import (
    check_channels,
    check_float,
    check_int,
    check_nchw,
    check_odd,
    from_blocks,
    masked_softmax_fp32,
    pad_hw_to_multiple,
    to_blocks,
)
from ..registry import register

__all__ = ['SelfAttn2d', 'SasaStem']


def _check_heads(out_channels: int, num_heads: int, multiple: int = 1) -> int:
    """Head width ``out_channels / num_heads``; ``out_channels`` must be divisible by ``num_heads * multiple``."""
    check_int('num_heads', num_heads)
    if out_channels % (num_heads * multiple):
        raise ValueError(
            f'out_channels={out_channels} must be divisible by {multiple} * num_heads={num_heads * multiple}')
    return out_channels // num_heads


@register(
    'sasa', paper='Stand-Alone Self-Attention in Vision Models', arxiv='1906.05909', year=2019, family='local',
    complexity='O(N·k²·C)',
)
class SelfAttn2d(nn.Module):
    """SASA local self-attention layer (a drop-in for a k×k convolution).

    Args:
        channels: input channels C.
        out_channels: output channels d_out (default C); divisible by ``2 * num_heads``.
        kernel_size: spatial extent k of the neighbourhood (odd, default 7).
        num_heads: attention heads N (default 8).
        stride: 1, or s > 1 for an s×s average pooling after the attention (the paper's downsampling).
        scale: multiplier of the logits, > 0 (default 1, the paper's unscaled logits).
        qkv_bias: bias in the q/k/v projections (default False).
        feat_size: accepted for timm's self-attention factories; unused (any H×W works).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, d_out, ceil(H / stride), ceil(W / stride)].
    """

    def __init__(
            self,
            channels: int,
            out_channels: int | None = None,
            *,
            kernel_size: int = 7,
            num_heads: int = 8,
            stride: int = 1,
            scale: float = 1.0,
            qkv_bias: bool = False,
            feat_size: tuple[int, int] | None = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.out_channels = check_channels(out_channels or channels, 'out_channels')
        check_odd('kernel_size', kernel_size)
        check_int('stride', stride)
        scale = check_float('scale', scale, 0., None, low_open=True)
        self.kernel_size = kernel_size
        self.num_heads = num_heads
        self.head_dim = _check_heads(self.out_channels, num_heads, 2)
        self.stride = stride
        self.scale = float(scale)
        self.qkv = nn.Conv2d(channels, 3 * self.out_channels, 1, bias=qkv_bias, **dd)
        self.rel_row = nn.Parameter(torch.empty(kernel_size, self.out_channels // 2, **dd))
        self.rel_col = nn.Parameter(torch.empty(kernel_size, self.out_channels // 2, **dd))
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Projections with fan-in normal init, relative embeddings N(0, 1/d_head)."""
        nn.init.normal_(self.qkv.weight, std=self.channels ** -0.5)
        if self.qkv.bias is not None:
            nn.init.zeros_(self.qkv.bias)
        nn.init.normal_(self.rel_row, std=self.head_dim ** -0.5)
        nn.init.normal_(self.rel_col, std=self.head_dim ** -0.5)

    def relative_embeddings(self) -> Tensor:
        """``r_{a-i, b-j}`` per head: [N, k·k, d_head], window positions in row-major order."""
        k = self.kernel_size
        r = torch.cat([
            self.rel_row[:, None, :].expand(k, k, -1),  # row offset a - i = index - k // 2
            self.rel_col[None, :, :].expand(k, k, -1),  # column offset b - j
        ], dim=-1)  # [k, k, d_out]
        return r.reshape(k * k, self.num_heads, self.head_dim).transpose(0, 1)

    def uncounted_macs(self, args: tuple[Tensor, ...], out: Tensor) -> int:
        """Multiply-adds of ``q·k`` and of the weighted sum of values, which run as elementwise products and sums
        that a FLOP counter does not see: d_out·k² per pixel each (``visattn.zoo.count_macs`` adds them)."""
        x = args[0]
        return 2 * x.shape[0] * self.out_channels * self.kernel_size ** 2 * x.shape[2] * x.shape[3]

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'SelfAttn2d')
        B, _, H, W = x.shape
        q, key, v = self.qkv(x).chunk(3, dim=1)
        rel = self.relative_embeddings().to(q.dtype)  # [N, k², D]
        if torch.is_grad_enabled() and (q.requires_grad or rel.requires_grad):
            out = self._attend_unfolded(q, key, v, rel, H, W)
        else:
            out = self._attend_shifted(q, key, v, rel, H, W)
        return self.pool(out.reshape(B, self.out_channels, H, W))

    def _attend_unfolded(self, q: Tensor, key: Tensor, v: Tensor, rel: Tensor, H: int, W: int) -> Tensor:
        """Training path: the zero-padded k×k neighbourhood of every pixel unfolded ([B, N, D, k², H·W] keys and
        values, which autograd keeps), contracted over D elementwise (no permuted copies). -> [B, N, D, H·W]."""
        B, k, N, D = q.shape[0], self.kernel_size, self.num_heads, self.head_dim
        q = q.reshape(B, N, D, 1, H * W)
        key = F.unfold(key, k, padding=k // 2).view(B, N, D, k * k, H * W)
        v = F.unfold(v, k, padding=k // 2).view(B, N, D, k * k, H * W)
        valid = F.unfold(q.new_ones(1, 1, H, W), k, padding=k // 2)[None] > 0  # [1, 1, k², HW]
        logits = (q * key).sum(2) + torch.einsum('bhdn,hwd->bhwn', q[:, :, :, 0], rel)  # [B, N, k², HW]
        attn = masked_softmax_fp32(logits * self.scale, valid, dim=2).to(v.dtype)
        return (attn[:, :, None] * v).sum(3)

    def _attend_shifted(self, q: Tensor, key: Tensor, v: Tensor, rel: Tensor, H: int, W: int) -> Tensor:
        """Inference path, the same function: a loop over the k² window offsets, each reading the zero-padded key
        and value maps shifted by the offset (views, nothing k² times the map is formed). -> [B, N, D, H, W]."""
        B, k, N, D = q.shape[0], self.kernel_size, self.num_heads, self.head_dim
        p = k // 2
        q = q.reshape(B, N, D, H, W)
        kp = F.pad(key, (p, p, p, p)).view(B, N, D, H + 2 * p, W + 2 * p)
        vp = F.pad(v, (p, p, p, p)).view(B, N, D, H + 2 * p, W + 2 * p)
        valid = F.unfold(q.new_ones(1, 1, H, W), k, padding=p).view(1, 1, k * k, H, W) > 0
        logits = torch.einsum('bhdyx,hwd->bhwyx', q, rel)  # [B, N, k², H, W]: the relative term
        for t in range(k * k):
            a, b = t // k, t % k
            logits[:, :, t] += (q * kp[:, :, :, a:a + H, b:b + W]).sum(2)
        attn = masked_softmax_fp32(logits * self.scale, valid, dim=2).to(v.dtype)
        out = attn[:, :, 0, None] * vp[:, :, :, :H, :W]
        for t in range(1, k * k):
            a, b = t // k, t % k
            out += attn[:, :, t, None] * vp[:, :, :, a:a + H, b:b + W]
        return out


class SasaStem(nn.Module):
    """The attention of the SASA stem: spatially-aware attention inside each ``block``×``block`` block.

    Args:
        in_channels: image channels (default 3).
        out_channels: stem width (default 64, the ResNet stem's).
        block_size: side of the attention blocks (default 4); the image is zero-padded and the padding masked.
        num_heads: attention heads (default 8).
        num_values: number M of value matrices mixed by the position-dependent weights (default 4).
        device, dtype: factory arguments.

    Shapes:
        x: [B, in_channels, H, W] -> [B, out_channels, H, W].
    """

    def __init__(
            self,
            in_channels: int = 3,
            out_channels: int = 64,
            *,
            block_size: int = 4,
            num_heads: int = 8,
            num_values: int = 4,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.in_channels = check_channels(in_channels, 'in_channels')
        self.out_channels = check_channels(out_channels, 'out_channels')
        self.block_size = check_channels(block_size, 'block_size')
        self.num_values = check_channels(num_values, 'num_values')
        self.num_heads = num_heads
        self.head_dim = _check_heads(out_channels, num_heads)
        self.qk = nn.Conv2d(in_channels, 2 * out_channels, 1, bias=False, **dd)
        self.v = nn.Conv2d(in_channels, num_values * out_channels, 1, bias=False, **dd)  # W_V^1 ... W_V^M
        self.emb_row = nn.Parameter(torch.empty(block_size, out_channels, **dd))
        self.emb_col = nn.Parameter(torch.empty(block_size, out_channels, **dd))
        self.value_mix = nn.Parameter(torch.empty(num_values, out_channels, **dd))  # ν^m
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.qk.weight, std=self.in_channels ** -0.5)
        nn.init.normal_(self.v.weight, std=self.in_channels ** -0.5)
        for p in (self.emb_row, self.emb_col, self.value_mix):
            nn.init.normal_(p, std=self.out_channels ** -0.5)

    def value_weights(self) -> Tensor:
        """``p(a, b, m) = softmax_m((emb_row(a) + emb_col(b))^T ν^m)``: [M, block, block]."""
        emb = self.emb_row[:, None, :] + self.emb_col[None, :, :]  # [b, b, C]
        return torch.softmax(torch.einsum('abc,mc->mab', emb, self.value_mix), dim=0)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.in_channels, 'SasaStem')
        B, _, H, W = x.shape
        b, M, C = self.block_size, self.num_values, self.out_channels
        x, valid = pad_hw_to_multiple(x, b)
        Hp, Wp = x.shape[-2:]
        q, k = self.qk(x).chunk(2, dim=1)
        p = self.value_weights().to(x.dtype).repeat(1, Hp // b, Wp // b)  # [M, Hp, Wp], position inside the block
        v = (self.v(x).view(B, M, C, Hp, Wp) * p[None, :, None]).sum(1)
        q, k, v = (to_blocks(t, b, self.num_heads) for t in (q, k, v))  # [B, N, blocks, b², D]
        mask = to_blocks(valid[None, None].to(x.dtype), b, 1)[:, :, :, None, :, 0] > 0  # [1, 1, blocks, 1, b²]
        attn = masked_softmax_fp32(q @ k.transpose(-1, -2), mask).to(v.dtype)
        return from_blocks(attn @ v, b, Hp, Wp)[:, :, :H, :W]
