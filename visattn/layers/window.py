"""Swin window attention (W-MSA / SW-MSA) and its Swin V2 form.

Papers: "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", Liu, Lin, Cao, Hu, Wei, Zhang,
Lin, Guo, ICCV 2021, arXiv:2103.14030 (https://arxiv.org/abs/2103.14030); "Swin Transformer V2: Scaling Up Capacity
and Resolution", Liu, Hu, Lin, Yao, Xie, Wei, Ning, Cao, Zhang, Dong, Wei, Guo, CVPR 2022, arXiv:2111.09883
(https://arxiv.org/abs/2111.09883).

The map is split into non-overlapping M×M windows (M = ``window_size``, default 7 as both papers) and multi-head
self-attention runs inside each window. With ``q, k, v = x W_qkv`` split into heads of width d and the position
``(y, x)`` of every token (eq. 4 of Swin, eq. 2 of Swin V2):

    Swin:     Attention(Q, K, V) = SoftMax(Q K^T / sqrt(d) + B) V
    Swin V2:  Sim(q_i, k_j) = cos(q_i, k_j) / τ + B_ij,   1/τ = exp(min(s_h, log 100)) per head h

then the heads are concatenated and projected (``proj``). Swin's bias ``B_ij`` is read from a learned table
``B̂ ∈ R^{(2M-1)×(2M-1)×heads}`` at the offset ``(y_i - y_j, x_i - x_j)`` (the table and its row-major index are
Swin's: row ``(dy + M - 1)·(2M - 1) + dx + M - 1``). Swin V2's is the log-spaced continuous position bias: the
offsets are normalised by ``M_pre - 1`` (``pretrained_window_size``, else M), scaled to [-8, 8] and log-spaced,
``Δ̂ = sign(Δ)·log2(1 + |Δ|) / log2(8)``, then ``B = 16·sigmoid(MLP(Δ̂y, Δ̂x))`` with a 2-layer ReLU MLP of width 512
(the released code's; the paper gives the form, not the width, and the 16·sigmoid is the released code's too). The
coordinates are computed in float32 (as the released code and timm), so float64 runs reproduce their values. Swin V2
has biases on q and v only (``q_bias``, ``v_bias``; k has none), as its released code.

Shifted windows (``shift_size`` s > 0, Swin's SW-MSA; s = M // 2 in the papers' alternating blocks): the windows are
those of the grid offset by s, i.e. the rows are cut at s, s + M, s + 2M, ... (and likewise the columns). It is
computed as the paper's cyclic shift, which keeps the number of windows: the map is rolled by -s, partitioned into
M×M windows, and inside the windows that wrap around the pairs of tokens that come from different regions are masked;
the output is rolled back.

Any H×W. The map is zero-padded at the bottom/right to a multiple of the window and the output cropped. Where a side
is not larger than M the window shrinks to that side and the shift along it is disabled, as Swin does (its blocks
shrink the window and drop the shift when the resolution is not larger than the window; per side as timm's
``_calc_window_shift``, where the released code uses ``min(H, W)`` for both); a map smaller than the window is thus
one window of the map's size. The bias of a smaller window is read from the same table at the same offsets (Swin V2:
the MLP at the same normalised offsets), so an offset has one bias whatever the map size (timm instead builds or
interpolates a table for the shrunk window). ``pad_mode`` says what the padded tokens do:

- ``'mask'`` (default): they are masked out of the keys, so every output is the attention over its window's pixels of
  the map, as the equations above; a map padded to M×M is then the same as one window of the map's size.
- ``'zeros'``: zero tokens take part as keys and values (after the projection: k and v of a zero token are the
  biases), as timm's ``SwinTransformerBlock`` and the released detection/segmentation code do. Shifted windows there
  pad then roll, as the released detection code; timm rolls the unpadded map and then pads, so that at sizes that are
  not multiples of the window its shifted mask no longer marks the wrapped regions (both agree at multiples).

The padding, the roll and the partition are one ``index_select`` of the map's pixels (and one back), with indices
and masks built for the size seen from coordinates (no loops, no cache): a pair is masked unless ``(region of i ==
region of j) and (j is a map pixel or i is not)``, so a padded query attends to the padded keys of its region and no
row is ever empty; masked pairs get -inf, so they have exactly zero weight whatever their logit. The attention is
``torch.nn.functional.scaled_dot_product_attention`` with the bias (and the -inf) as ``attn_mask`` where no gradient
is recorded or off the CPU (its fused CPU kernel; it computes the softmax in float32 for 16-bit inputs and in float64
for float64 ones), and the same softmax as two batched matmuls on the CPU with autograd, where SDPA would fall back
to its slower plain path (its CPU kernel has no gradient for the mask).

Parameter names are those of timm's ``timm.models.swin_transformer.WindowAttention`` (``qkv``, ``proj``,
``relative_position_bias_table``) and ``timm.models.swin_transformer_v2.WindowAttention`` (``qkv`` without bias,
``q_bias``, ``v_bias``, ``logit_scale`` [heads, 1, 1], ``cpb_mlp.0`` / ``cpb_mlp.2``, ``proj``), so that their state
dicts load as they are. Initialisation as Swin's: linear weights truncated normal (std 0.02) with zero biases, the
relative table truncated normal (std 0.02); Swin V2's ``logit_scale`` log(10), ``q_bias``/``v_bias`` 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_channels, check_int, check_nchw, check_prob, needs_grad, softmax_fp32
from ..registry import register

__all__ = ['WindowAttn', 'WindowAttnV2']

PAD_MODES = ('mask', 'zeros')


def _check_args(channels: int, num_heads: int, window_size: int, shift_size: int, pad_mode: str) -> None:
    check_int('window_size', window_size)
    check_int('shift_size', shift_size, 0, window_size - 1)
    check_int('num_heads', num_heads)
    if channels % num_heads:
        raise ValueError(f'channels={channels} must be divisible by num_heads, got num_heads={num_heads}')
    if pad_mode not in PAD_MODES:
        raise ValueError(f'pad_mode must be one of {PAD_MODES}, got {pad_mode!r}')


def window_geometry(height: int, width: int, window_size: int, shift_size: int) -> tuple[int, int, int, int]:
    """The window ``(wh, ww)`` and shift ``(sh, sw)`` used at an H×W map: a side not larger than the window gives a
    window of that side and no shift along it (Swin's rule)."""
    wh, ww = min(height, window_size), min(width, window_size)
    sh = shift_size if height > window_size else 0
    sw = shift_size if width > window_size else 0
    return wh, ww, sh, sw


def window_layout(
        height: int, width: int, wh: int, ww: int, sh: int, sw: int, device: torch.device,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Where the tokens of the shifted windows come from, built from coordinates for an H×W map.

    The map is padded at the bottom/right to ``Hp × Wp`` (multiples of the window), rolled by ``(-sh, -sw)`` and cut
    into ``nW`` windows of ``N = wh·ww`` tokens (row-major windows, row-major tokens inside).

    Returns:
        src: [nW·N] the map position (``y·W + x``) of every window token; padding tokens get a map position too (the
            border one), which the caller zeroes or masks.
        inv: [H·W] the window token of every map position (the inverse of ``src`` on the map).
        on_map: [nW, N] bool, the token is a map pixel (not padding).
        region: [nW, N] the region of every token: the shifted grid's window, cut at ``s + k·M`` of the padded map
            (tokens of one window that come from different regions of the roll must not attend to each other).
    """
    Hp, Wp = -(-height // wh) * wh, -(-width // ww) * ww
    nw = Wp // ww
    py = ((torch.arange(Hp, device=device) + sh) % Hp).view(-1, 1, wh, 1)  # padded-map row of every rolled row
    px = ((torch.arange(Wp, device=device) + sw) % Wp).view(1, -1, 1, ww)
    src = py.clamp(max=height - 1) * width + px.clamp(max=width - 1)  # [nh, nw, wh, ww]
    on_map = (py < height) & (px < width)
    region = torch.div(py - sh + wh, wh, rounding_mode='floor') * (nw + 1) \
        + torch.div(px - sw + ww, ww, rounding_mode='floor')
    ry = (torch.arange(height, device=device) - sh) % Hp  # rolled row of every map row
    rx = (torch.arange(width, device=device) - sw) % Wp
    inv = (torch.div(ry, wh, rounding_mode='floor')[:, None] * nw + torch.div(rx, ww, rounding_mode='floor')[None, :]) \
        * (wh * ww) + (ry % wh)[:, None] * ww + (rx % ww)[None, :]
    n = wh * ww  # src, on_map and region are [nh, nw, wh, ww]
    return src.reshape(-1), inv.reshape(-1), on_map.reshape(-1, n), region.reshape(-1, n)


def to_windows(x: Tensor, src: Tensor, on_map: Tensor, zero_padding: bool) -> Tensor:
    """[B, C, H, W] -> [B, nW, N, C], the tokens of the windows gathered in one pass (padding tokens zeroed where
    ``zero_padding``; otherwise they are copies of border pixels, which the mask hides)."""
    B, C = x.shape[0], x.shape[1]
    t = x.flatten(2).transpose(1, 2).index_select(1, src)  # [B, nW·N, C]
    if zero_padding:
        t = t.masked_fill(~on_map.view(-1, 1), 0.)
    return t.view(B, on_map.shape[0], on_map.shape[1], C)


def from_windows(t: Tensor, inv: Tensor, height: int, width: int) -> Tensor:
    """[B, nW, N, C] -> [B, C, H, W] (contiguous), the inverse of `to_windows` on the map."""
    B, nW, n, C = t.shape
    # rows of C gathered, then one transposing copy (gathering along the strided map axis is slower)
    return t.reshape(B, nW * n, C).index_select(1, inv).transpose(1, 2).reshape(B, C, height, width)


def window_mask(on_map: Tensor, region: Tensor, mask_padding: bool) -> Tensor:
    """[nW, 1, N, N] bool, True where query i of a window may attend to key j: same region and, with
    ``mask_padding``, j on the map or i not (a padding query sees its region, so no row is empty)."""
    mask = region[:, :, None] == region[:, None, :]
    if mask_padding:
        mask = mask & (on_map[:, None, :] | ~on_map[:, :, None])
    return mask[:, None]


def _mask_if_needed(on_map: Tensor, region: Tensor, shifted: bool, padded: bool, pad_mode: str) -> Tensor | None:
    if shifted or (padded and pad_mode == 'mask'):
        return window_mask(on_map, region, pad_mode == 'mask')
    return None


def relative_position_index(wh: int, ww: int, window_size: int, device: torch.device) -> Tensor:
    """[wh·ww, wh·ww] rows of Swin's (2M-1)² table for the query/key pairs of a wh×ww window (M = ``window_size``):
    ``(dy + M - 1)·(2M - 1) + dx + M - 1`` with ``dy = y_i - y_j``, ``dx = x_i - x_j``."""
    ys = torch.arange(wh, device=device)[:, None].expand(wh, ww).reshape(-1)
    xs = torch.arange(ww, device=device)[None, :].expand(wh, ww).reshape(-1)
    dy = ys[:, None] - ys[None, :] + window_size - 1
    dx = xs[:, None] - xs[None, :] + window_size - 1
    return dy * (2 * window_size - 1) + dx


def _split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """[B, nW, N, 3C] -> q, k, v, each [B, nW, heads, N, d] (strided views)."""
    B, nW, n, C3 = qkv.shape
    q, k, v = qkv.view(B, nW, n, 3, num_heads, C3 // (3 * num_heads)).permute(3, 0, 1, 4, 2, 5).unbind(0)
    return q, k, v


def _attend(
        q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: Tensor | None, scale: float, dropout_p: float,
) -> Tensor:
    """softmax(q kᵀ·scale + bias, -inf where ``mask`` is False) v, heads merged: q, k, v [B, nW, heads, N, d],
    bias [heads, N, N], mask [nW, 1, N, N] -> [B, nW, N, heads·d].

    Without autograd, or off the CPU, it is one ``scaled_dot_product_attention`` call on 4-D tensors (the windows of
    the batch flattened) with a 4-D mask: the bias [1, heads, N, N] where nothing is masked, else the masked bias
    expanded over the batch. That is the layout its fused CPU kernel takes (a broadcast 5-D call falls back to its
    plain path). On the CPU with autograd SDPA falls back to its plain path anyway (its fused CPU kernel has no
    gradient for the mask); the batched matmuls below do the same with fewer passes (no mask expanded over the
    batch, no check for empty rows: no row is empty)."""
    B, nW, N, n, D = q.shape
    attn_mask = bias.to(q.dtype)
    if mask is not None:
        attn_mask = torch.where(mask, attn_mask, torch.full_like(attn_mask[:1, :1, :1], float('-inf')))
    if q.device.type == 'cpu' and needs_grad([q, k, v, attn_mask]):
        logits = torch.matmul(q * scale if scale != 1. else q, k.transpose(-1, -2))  # [B, nW, heads, N, N]
        attn = softmax_fp32(logits.add_(attn_mask), -1)  # in place: the matmul's backward does not need its output
        if dropout_p > 0.:
            attn = F.dropout(attn, dropout_p)
        out = torch.matmul(attn, v)  # [B, nW, heads, N, d]
    else:
        if mask is None:
            attn_mask = attn_mask[None]
        else:
            attn_mask = attn_mask.expand(B, nW, N, n, n).reshape(B * nW, N, n, n)
        out = F.scaled_dot_product_attention(q.reshape(B * nW, N, n, D), k.reshape(B * nW, N, n, D),
                                             v.reshape(B * nW, N, n, D), attn_mask=attn_mask, dropout_p=dropout_p,
                                             scale=scale).view(B, nW, N, n, D)
    return out.transpose(2, 3).reshape(B, nW, n, N * D)


@register(
    'window', paper='Swin Transformer: Hierarchical Vision Transformer using Shifted Windows', arxiv='2103.14030',
    year=2021, family='local', complexity='O(N·M²·C)',
)
class WindowAttn(nn.Module):
    """Swin (shifted) window multi-head self-attention with a relative position bias table.

    Args:
        channels: input and output channels C, divisible by ``num_heads``.
        num_heads: attention heads (default 8; Swin uses C / 32).
        window_size: side M of the windows (default 7, as Swin).
        shift_size: shift s of the windows, 0 <= s < M (default 0: W-MSA; Swin's SW-MSA blocks use M // 2).
        qkv_bias: bias in the q/k/v projection (default True, as Swin).
        attn_drop: dropout on the attention weights (default 0).
        proj_drop: dropout after the output projection (default 0).
        pad_mode: ``'mask'`` (default: padded tokens are masked out of the keys) or ``'zeros'`` (they take part as
            zero tokens, as timm and the released code); see the module docstring.
        feat_size: accepted for timm's self-attention factories; unused (any H×W works).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
            self,
            channels: int,
            *,
            num_heads: int = 8,
            window_size: int = 7,
            shift_size: int = 0,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            pad_mode: str = 'mask',
            feat_size: tuple[int, int] | None = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        _check_args(channels, num_heads, window_size, shift_size, pad_mode)
        self.num_heads, self.window_size, self.shift_size = num_heads, window_size, shift_size
        self.pad_mode = pad_mode
        self.scale = (channels // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * window_size - 1) ** 2, num_heads, **dd))
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(check_prob('attn_drop', attn_drop))
        self.proj = nn.Linear(channels, channels, **dd)
        self.proj_drop = nn.Dropout(check_prob('proj_drop', proj_drop))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Swin's init: truncated normal (std 0.02) linear weights and table, zero biases."""
        for w in (self.qkv.weight, self.proj.weight, self.relative_position_bias_table):
            nn.init.trunc_normal_(w, std=.02)
        for b in (self.qkv.bias, self.proj.bias):
            if b is not None:
                nn.init.zeros_(b)

    def relative_position_bias(self, wh: int, ww: int) -> Tensor:
        """B of a wh×ww window: [heads, wh·ww, wh·ww]."""
        idx = relative_position_index(wh, ww, self.window_size, self.relative_position_bias_table.device)
        n = wh * ww
        return self.relative_position_bias_table[idx.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'WindowAttn')
        H, W = x.shape[-2], x.shape[-1]
        wh, ww, sh, sw = window_geometry(H, W, self.window_size, self.shift_size)
        src, inv, on_map, region = window_layout(H, W, wh, ww, sh, sw, x.device)
        padded = H % wh != 0 or W % ww != 0
        t = to_windows(x, src, on_map, padded and self.pad_mode == 'zeros')  # [B, nW, N, C]
        q, k, v = _split_heads(self.qkv(t), self.num_heads)
        mask = _mask_if_needed(on_map, region, sh != 0 or sw != 0, padded, self.pad_mode)
        dropout_p = self.attn_drop.p if self.training else 0.
        out = _attend(q, k, v, self.relative_position_bias(wh, ww), mask, self.scale, dropout_p)
        return from_windows(self.proj_drop(self.proj(out)), inv, H, W)


@register(
    'window_v2', paper='Swin Transformer V2: Scaling Up Capacity and Resolution', arxiv='2111.09883',
    year=2022, family='local', complexity='O(N·M²·C)',
)
class WindowAttnV2(nn.Module):
    """Swin V2 (shifted) window attention: scaled cosine attention with a log-spaced continuous position bias.

    Args:
        channels: input and output channels C, divisible by ``num_heads``.
        num_heads: attention heads (default 8; Swin V2 uses C / 32).
        window_size: side M of the windows (default 7).
        shift_size: shift s of the windows, 0 <= s < M (default 0).
        qkv_bias: biases on q and v (``q_bias``, ``v_bias``; k has none), default True as Swin V2.
        attn_drop: dropout on the attention weights (default 0).
        proj_drop: dropout after the output projection (default 0).
        pretrained_window_size: the window side the position MLP was trained at, which normalises the offsets
            (default None or 0, timm's "none": the window size M).
        pad_mode: ``'mask'`` (default) or ``'zeros'``, as `WindowAttn`.
        feat_size: accepted for timm's self-attention factories; unused (any H×W works).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
            self,
            channels: int,
            *,
            num_heads: int = 8,
            window_size: int = 7,
            shift_size: int = 0,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            pretrained_window_size: int | None = None,
            pad_mode: str = 'mask',
            feat_size: tuple[int, int] | None = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        _check_args(channels, num_heads, window_size, shift_size, pad_mode)
        if pretrained_window_size is not None:
            check_int('pretrained_window_size', pretrained_window_size, 0)
        self.num_heads, self.window_size, self.shift_size = num_heads, window_size, shift_size
        self.pretrained_window_size = pretrained_window_size or 0
        self.pad_mode = pad_mode
        self.logit_scale = nn.Parameter(torch.empty(num_heads, 1, 1, **dd))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, 512, **dd), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False, **dd))
        self.qkv = nn.Linear(channels, 3 * channels, bias=False, **dd)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.empty(channels, **dd))
            self.v_bias = nn.Parameter(torch.empty(channels, **dd))
        else:
            self.q_bias = None
            self.v_bias = None
        self.attn_drop = nn.Dropout(check_prob('attn_drop', attn_drop))
        self.proj = nn.Linear(channels, channels, **dd)
        self.proj_drop = nn.Dropout(check_prob('proj_drop', proj_drop))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Swin V2's init: truncated normal (std 0.02) linear weights, zero biases, ``logit_scale`` log(10)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.logit_scale, math.log(10.))
        for b in (self.q_bias, self.v_bias):
            if b is not None:
                nn.init.zeros_(b)

    def relative_coords_table(self) -> Tensor:
        """The log-spaced offsets of the (2M-1)² table [(2M-1)², 2] (float32 as the released code, in the MLP's
        dtype): ``sign(8Δ/(M_pre - 1))·log2(1 + |8Δ/(M_pre - 1)|) / log2(8)``."""
        M = self.window_size
        norm = max((self.pretrained_window_size if self.pretrained_window_size > 0 else M) - 1, 1)
        w = self.cpb_mlp[0].weight
        d = torch.arange(-(M - 1), M, device=w.device, dtype=torch.float32) / norm * 8.  # the released code's order
        d = torch.sign(d) * torch.log2(d.abs() + 1.) / 3.  # / log2(8)
        n = 2 * M - 1
        return torch.stack([d[:, None].expand(n, n), d[None, :].expand(n, n)], -1).reshape(-1, 2).to(w.dtype)

    def relative_position_bias(self, wh: int, ww: int) -> Tensor:
        """B = 16·sigmoid(MLP(Δ̂)) of a wh×ww window: [heads, wh·ww, wh·ww]."""
        table = self.cpb_mlp(self.relative_coords_table())  # [(2M-1)², heads]
        idx = relative_position_index(wh, ww, self.window_size, table.device)
        n = wh * ww
        return 16 * torch.sigmoid(table[idx.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous())

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'WindowAttnV2')
        H, W = x.shape[-2], x.shape[-1]
        wh, ww, sh, sw = window_geometry(H, W, self.window_size, self.shift_size)
        src, inv, on_map, region = window_layout(H, W, wh, ww, sh, sw, x.device)
        padded = H % wh != 0 or W % ww != 0
        t = to_windows(x, src, on_map, padded and self.pad_mode == 'zeros')  # [B, nW, N, C]
        q_bias, v_bias = self.q_bias, self.v_bias
        if q_bias is not None and v_bias is not None:
            qkv = F.linear(t, self.qkv.weight, torch.cat((q_bias, torch.zeros_like(v_bias), v_bias)))
        else:
            qkv = self.qkv(t)
        q, k, v = _split_heads(qkv, self.num_heads)
        # cos(q, k) / τ: unit q scaled per head by 1/τ = exp(min(s, log 100)), unit k, SDPA at scale 1
        inv_tau = torch.clamp(self.logit_scale, max=math.log(100.)).exp().to(q.dtype)
        q = F.normalize(q, dim=-1) * inv_tau
        k = F.normalize(k, dim=-1)
        mask = _mask_if_needed(on_map, region, sh != 0 or sw != 0, padded, self.pad_mode)
        dropout_p = self.attn_drop.p if self.training else 0.
        out = _attend(q, k, v, self.relative_position_bias(wh, ww), mask, 1., dropout_p)
        return from_windows(self.proj_drop(self.proj(out)), inv, H, W)
