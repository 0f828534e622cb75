"""Contextual Transformer (CoT) block: self-attention over a k×k neighbourhood whose attention matrix is learnt
from the query and the contextualised keys, fused with the static context.

Paper: "Contextual Transformer Networks for Visual Recognition", Li, Yao, Pan, Mei, TPAMI 2022 (arXiv 2021),
arXiv:2107.12292 (https://arxiv.org/abs/2107.12292). Released code: JDAI-CV/CoTNet, ``models/cotnet.py``
(``CotLayer``) and ``cupy_layers/aggregation_zeropad.py`` (its local-conv CUDA op).

With the input X [B, C, H, W] as queries and keys (the paper's Q = K = X):

    K¹ = ReLU(BN(Conv_k×k^{groups}(X)))                                  static context (``key_embed``)
    A  = GN(W_θ ReLU(BN(W_δ [X, K¹])) + b_θ)                             [B, (C/S)·k², H, W] (``embed``)
    V  = BN(W_v X)                                                       values (``conv1x1``)
    K²_{c,i} = Σ_{t ∈ k×k} A_{c mod C/S, t, i} · V_{c, i + o_t}          dynamic context (local aggregation)
    K² ← SiLU(BN(K²))                                                    (``bn``, ``act``)
    s = GAP(K² + K¹);  a = softmax_r(W_2 ReLU(BN(W_1 s + b_1)) + b_2)    radix-2 fusion weights (``se``)
    Y = a_0 · K² + a_1 · K¹

``[X, K¹]`` concatenates along channels, X first (the released code's order; the paper writes [K¹, Q]). The
attention is shared by the S = ``share_planes`` channel groups: input channel c uses weight channel ``c mod C/S``
(the released op's ``c % weight_channels``), so A has C/S · k² channels and the GroupNorm has C/S groups of k²
channels (one group per weight channel). The window is zero-padded at the borders (the released op skips keys
outside the map: their value is 0 and the weights of the k² positions are not renormalised; A is not a softmax).
The fusion logits sit at channel ``2c + r`` of the last conv (the released ``view(B, C, radix)``), and its width is
``max(C · 2 / reduction_factor, min_attn_channels)``. The parameter names are the released ``CotLayer``'s, so a
CoTNet checkpoint's layer weights load as they are.

Defaults are the released code's: k = 3, key groups 4, ``share_planes=8``, ``embed_factor=2`` (the hidden width
C/2 of the attention embedding), ``reduction_factor=4`` with a floor of 32 channels, SiLU (swish) after the
aggregation. ``stride=2`` is the released Bottleneck's ``avd``: a 3×3 average pool with stride 2 and padding 1
(zero padding counted) in front of the layer, so the output is ceil(H/2) × ceil(W/2).

The local aggregation is computed as k² shifted multiply-adds over the zero-padded values (the same sum as an
unfold of V weighted by A, without materialising the [B, C·k², H·W] unfold); in eager mode under autograd its
backward is hand-written (`cot_aggregate`), so the shifts' backward forms no padded copies per offset.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import (
    check_channels,
    check_int,
    check_nchw,
    check_odd,
    get_act,
    is_compiling,
    mean_expanded_grad,
    softmax_fp32,
)
from ..registry import register
from .sk import branch_mix

__all__ = ['ContextualTransformer', 'cot_aggregate']


def _aggregate(v: Tensor, w: Tensor, kernel_size: int, share_planes: int) -> Tensor:
    """``y_{c,i} = Σ_t w_{c mod C/S, t, i} · v_{c, i + o_t}`` (zero padding): v [B, C, H, W], w [B, C/S·k², H, W].

    Accumulated in at least float32; returned in ``promote_types(v.dtype, w.dtype)``.
    """
    B, C, H, W = v.shape
    k, r = kernel_size, kernel_size // 2
    Cw = C // share_planes
    out_dtype = torch.promote_types(v.dtype, w.dtype)
    acc = torch.promote_types(out_dtype, torch.float32)
    vp = F.pad(v, (r, r, r, r)).view(B, share_planes, Cw, H + 2 * r, W + 2 * r)
    wt = w.view(B, 1, Cw, k * k, H, W)
    y = (wt[:, :, :, 0] * vp[:, :, :, :H, :W]).to(acc)
    for t in range(1, k * k):
        di, dj = t // k, t % k
        y = y + wt[:, :, :, t] * vp[:, :, :, di:di + H, dj:dj + W]
    return y.view(B, C, H, W).to(out_dtype)


class _Aggregate(torch.autograd.Function):
    """`_aggregate` accumulated in place, with a backward of k² in-place shifted multiply-adds."""

    @staticmethod
    def forward(ctx, v: Tensor, w: Tensor, kernel_size: int, share_planes: int) -> Tensor:
        B, C, H, W = v.shape
        k, r = kernel_size, kernel_size // 2
        out_dtype = torch.promote_types(v.dtype, w.dtype)
        vp = F.pad(v, (r, r, r, r)).view(B, share_planes, C // share_planes, H + 2 * r, W + 2 * r)
        wt = w.view(B, 1, C // share_planes, k * k, H, W)
        y = (wt[:, :, :, 0] * vp[:, :, :, :H, :W]).to(torch.promote_types(out_dtype, torch.float32))
        for t in range(1, k * k):
            di, dj = t // k, t % k
            y.addcmul_(wt[:, :, :, t], vp[:, :, :, di:di + H, dj:dj + W])
        ctx.save_for_backward(vp, w)
        ctx.kernel_size = kernel_size
        return y.view(B, C, H, W).to(out_dtype)

    @staticmethod
    def backward(ctx, dy: Tensor):
        vp, w = ctx.saved_tensors
        k = ctx.kernel_size
        r = k // 2
        B, S, Cw, Hp, Wp = vp.shape
        H, W = Hp - 2 * r, Wp - 2 * r
        acc = torch.promote_types(dy.dtype, torch.float32)
        dy = dy.reshape(B, S, Cw, H, W)
        wt = w.view(B, 1, Cw, k * k, H, W)
        dv = dw = None
        if ctx.needs_input_grad[0]:
            dvp = dy.new_zeros((B, S, Cw, Hp, Wp), dtype=acc)
            for t in range(k * k):
                di, dj = t // k, t % k
                dvp[:, :, :, di:di + H, dj:dj + W].addcmul_(dy, wt[:, :, :, t])
            dv = dvp[:, :, :, r:r + H, r:r + W].reshape(B, S * Cw, H, W).to(vp.dtype)
        if ctx.needs_input_grad[1]:
            dw = torch.empty((B, Cw, k * k, H, W), dtype=w.dtype, device=w.device)
            for t in range(k * k):
                di, dj = t // k, t % k
                dw[:, :, t] = (dy * vp[:, :, :, di:di + H, dj:dj + W]).sum(1, dtype=acc)
            dw = dw.view_as(w)
        return dv, dw, None, None


def cot_aggregate(v: Tensor, w: Tensor, kernel_size: int, share_planes: int) -> Tensor:
    """CoT's local aggregation (the released ``LocalConvolution`` with zero padding):
    ``y_{c,i} = Σ_{t ∈ k×k} w_{c mod C/S, t, i} · v_{c, i + o_t}``.

    Args:
        v: values [B, C, H, W].
        w: weights [B, (C/S)·k², H, W], channel ``c_w · k² + t`` (t row-major in the window).
        kernel_size: k (odd).
        share_planes: S, the number of channel groups sharing one weight channel.

    Returns:
        [B, C, H, W] in ``promote_types(v.dtype, w.dtype)``.
    """
    if not torch.jit.is_scripting() and not is_compiling():
        if torch.is_grad_enabled() and (v.requires_grad or w.requires_grad):
            return _Aggregate.apply(v, w, kernel_size, share_planes)
    return _aggregate(v, w, kernel_size, share_planes)


@register(
    'cot', paper='Contextual Transformer Networks for Visual Recognition', arxiv='2107.12292', year=2022,
    family='local', complexity='O(N·k²·C)',
)
class ContextualTransformer(nn.Module):
    """CoT block (the released ``CotLayer``), a drop-in for the 3×3 convolution of a bottleneck.

    Args:
        channels: input and output channels C; divisible by ``key_groups`` and by ``share_planes``.
        kernel_size: window k of the static context and of the aggregation, odd (default 3).
        stride: 1, or 2 for the released code's 3×3 average pool (stride 2, padding 1) in front (default 1).
        key_groups: groups of the k×k key convolution (default 4).
        share_planes: S, channel groups that share one attention channel (default 8).
        embed_factor: the attention embedding's hidden width is C / embed_factor (default 2).
        reduction_factor: the fusion's hidden width is 2C / reduction_factor ... (default 4)
        min_attn_channels: ... but at least this (default 32).
        act_layer: activation after the aggregation's BN (default SiLU, the released swish).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, ceil(H / stride), ceil(W / stride)]. In training mode the fusion's BN (on pooled
        vectors) needs B >= 2.
    """

    def __init__(
            self,
            channels: int,
            *,
            kernel_size: int = 3,
            stride: int = 1,
            key_groups: int = 4,
            share_planes: int = 8,
            embed_factor: int = 2,
            reduction_factor: int = 4,
            min_attn_channels: int = 32,
            act_layer: type[nn.Module] | str = nn.SiLU,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        C = self.channels = check_channels(channels)
        self.kernel_size = check_odd('kernel_size', kernel_size)
        self.stride = check_int('stride', stride, 1, 2)
        check_int('key_groups', key_groups)
        self.share_planes = check_int('share_planes', share_planes)
        check_int('embed_factor', embed_factor, 1, C)
        check_int('reduction_factor', reduction_factor)
        check_int('min_attn_channels', min_attn_channels)
        if C % key_groups:
            raise ValueError(f'key_groups must divide channels={C}, got {key_groups}')
        if C % share_planes:
            raise ValueError(f'share_planes must divide channels={C}, got {share_planes}')
        k2, Cw = kernel_size * kernel_size, C // share_planes
        self.radix = 2
        self.attn_channels = max(C * self.radix // reduction_factor, min_attn_channels)
        self.pool = nn.AvgPool2d(3, 2, padding=1) if stride == 2 else nn.Identity()
        self.key_embed = nn.Sequential(
            nn.Conv2d(C, C, kernel_size, padding=kernel_size // 2, groups=key_groups, bias=False, **dd),
            nn.BatchNorm2d(C, **dd),
            nn.ReLU(inplace=True),
        )
        self.embed = nn.Sequential(
            nn.Conv2d(2 * C, C // embed_factor, 1, bias=False, **dd),
            nn.BatchNorm2d(C // embed_factor, **dd),
            nn.ReLU(inplace=True),
            nn.Conv2d(C // embed_factor, k2 * Cw, 1, **dd),
            nn.GroupNorm(Cw, k2 * Cw, **dd),
        )
        self.conv1x1 = nn.Sequential(nn.Conv2d(C, C, 1, bias=False, **dd), nn.BatchNorm2d(C, **dd))
        self.bn = nn.BatchNorm2d(C, **dd)
        self.act = get_act(act_layer, inplace=True)
        self.se = nn.Sequential(
            nn.Conv2d(C, self.attn_channels, 1, **dd),
            nn.BatchNorm2d(self.attn_channels, **dd),
            nn.ReLU(inplace=True),
            nn.Conv2d(self.attn_channels, self.radix * C, 1, **dd),
        )

    def uncounted_macs(self, args: tuple[Tensor, ...], out: Tensor) -> int:
        """Multiply-adds of the local aggregation, which runs as elementwise products and sums that a FLOP counter
        does not see: k² per output element (``visattn.zoo.count_macs`` adds them)."""
        return out.numel() * self.kernel_size ** 2

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'ContextualTransformer')
        if self.training and x.shape[0] == 1:
            raise ValueError(
                'ContextualTransformer: the fusion normalises pooled vectors over the batch (BatchNorm) and needs '
                f'a batch of at least 2 in training mode, got shape {list(x.shape)}; use eval() for a single image')
        x = self.pool(x)
        B = x.shape[0]
        k = self.key_embed(x)  # static context K¹
        w = self.embed(torch.cat([x, k], dim=1))  # [B, C/S·k², H, W]
        v = self.conv1x1(x)
        y = self.act(self.bn(cot_aggregate(v, w, self.kernel_size, self.share_planes).to(v.dtype)))  # K²
        s = mean_expanded_grad(y, [2, 3], keepdim=True) + mean_expanded_grad(k, [2, 3], keepdim=True)
        logits = self.se(s).view(B, self.channels, self.radix).transpose(1, 2)  # channel 2c + r -> [B, 2, C]
        a = softmax_fp32(logits, dim=1).to(y.dtype).reshape(B, self.radix, self.channels, 1, 1)
        if not torch.jit.is_scripting() and not is_compiling():
            return branch_mix(a, [y, k])  # a_0 K² + a_1 K¹, with a backward that forms no product map
        return y * a[:, 0] + k * a[:, 1]
