"""ACmix: a mixed self-attention and convolution layer sharing its 1×1 projections.

Paper: "On the Integration of Self-Attention and Convolution", Pan, Ge, Lu, Song, Chen, Huang, Huang, CVPR 2022,
arXiv:2111.14556 (https://arxiv.org/abs/2111.14556). Released code: LeapLabTHU/ACmix, ``ResNet/test_bottleneck.py``
(class ``ACmix``); this module keeps its parameter names, so that its state dict loads as it is.

Stage I: three 1×1 convolutions (with bias) give ``q``, ``k``, ``v`` (``out_channels`` each), each split into N heads
of ``D = out_channels / N`` channels: 3N feature maps of D channels.

Stage II, self-attention path: local attention over the ``k_att × k_att`` window around every query (k_att = 7),
with the released code's positional encoding of coordinates, ``pe = W_p · (x_j, y_i) + b_p`` (a 1×1 conv from the
two coordinates, each ``linspace(-1, 1)`` over the map, to D channels, shared by the heads):

    a_ij,ab = softmax_ab( D^-1/2 · q_ij · (k_ab + pe_ij - pe_ab) ),    y^att_ij = Σ_ab a_ij,ab v_ab

The term ``q_ij · pe_ij`` is the same for every key of a query, so softmax removes it: it is left out of the
computation (the output and every gradient are those of the formula with it; ``b_p`` cancels likewise). The window is
taken on the map reflection-padded by ``k_att // 2`` as the released code does (``ReflectionPad2d`` before its
``Unfold``): at the border the window holds mirrored pixels, keys and positional encodings, counted once per
mirrored copy. Maps too small for a plain reflection (a side <= k_att // 2) are reflected repeatedly (the index folds
back and forth over the map; a 1-pixel side repeats its pixel), which equals ``ReflectionPad2d`` wherever that is
defined. ``pad_mode='mask'`` instead leaves keys outside the map out of the softmax (as SASA).

Stage II, convolution path: a fully connected layer (``fc``, no bias) maps the 3N features at each position and head
channel d to k_conv² features, ``f_t = Σ_c W_fc[t, c] · (q|k|v)_c``, which are shifted to the k_conv × k_conv kernel
positions and summed; as the released code the shift-and-sum is a group convolution (``dep_conv``: groups = D, N
outputs per group, zero padding, bias) whose weights start as the one-hot shift kernels and stay learnable
(``learnable_shift=False`` freezes them, the paper's fixed shift):

    y^conv_o = b_o + Σ_t Σ_uv W_dep[o, t, u, v] · f_{d(o), t}(i + u - k_conv // 2, j + v - k_conv // 2),  d(o) = o // N

Output: ``α · y^att + β · y^conv`` with learnable scalars α = ``rate1``, β = ``rate2``, both initialised to 0.5 as the
released code (``init_rate_half``; the paper does not give the value). Channel ``n·D + d`` of ``y^att`` is head n,
channel d; channel o of ``y^conv`` comes from head channel ``o // N`` (the released layout).

``stride = s`` evaluates both paths at the pixels ``(s·i, s·j)`` (the released code's strided query and unfold, and
its strided ``dep_conv``): the output is ``ceil(H / s) × ceil(W / s)`` (the released code computes this grid too but
its reshape needs H and W divisible by s). ``k_att`` and ``k_conv`` must be odd (centred windows; the released code's
padding assumes it).

The window attention runs as a loop over the k_att² window offsets on the padded map (no unfold: memory
O(H·W·(C + N·k_att²))), with a hand-written backward in eager mode that accumulates the window gradients in place;
TorchScript and ``torch.compile`` take the same loop through autograd. The attention path computes in at least
float32 (16-bit inputs), the projections and the convolution path in the input's dtype.

Defaults from the released code: k_att = 7, heads = 4, k_conv = 3, α = β = 0.5, PyTorch's default initialisation of
the 1×1 convolutions and ``fc``, shift kernels and zero bias for ``dep_conv``. In the released ResNet the model's
Kaiming loop re-initialises ``dep_conv``'s weight too (every ``nn.Conv2d``); a backbone that wants the shift start
must skip it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_channels, check_int, check_nchw, check_odd, is_compiling, masked_softmax_fp32, needs_grad
from ..registry import register

__all__ = ['ACmix']

PAD_MODES = ('reflect', 'mask')


def _fold_index(n: int, p: int, device: torch.device) -> Tensor:
    """Indices of the map positions ``-p .. n + p - 1`` reflected repeatedly into ``0 .. n - 1`` (period 2n - 2)."""
    i = torch.arange(-p, n + p, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * n - 2
    m = torch.remainder(i, period)
    return torch.where(m < n, m, period - m)


def _reflect_pad(x: Tensor, p: int) -> Tensor:
    """Reflection padding of the last two dims by ``p``; repeated reflection where a side is <= p."""
    H, W = x.shape[-2:]
    if H > p and W > p:
        return F.pad(x, (p, p, p, p), mode='reflect')
    return x.index_select(-2, _fold_index(H, p, x.device)).index_select(-1, _fold_index(W, p, x.device))


def _window_attn(q: Tensor, kp: Tensor, vp: Tensor, mask: Tensor | None, k: int, s: int) -> Tensor:
    """Local attention of every query over its k×k window, as a loop over the k² window offsets (no unfold).

    Args:
        q: scaled queries [B', D, Ho, Wo].
        kp, vp: padded keys and values [B', D, s·(Ho-1) + k, s·(Wo-1) + k]; the window of query (i, j) is
            ``[s·i, s·i + k) × [s·j, s·j + k)``.
        mask: [1, k², Ho, Wo] keys inside the map (None: every key counts).
        k: window size; s: stride.

    Returns:
        [B', D, Ho, Wo].
    """
    attn = _window_softmax(q, kp, mask, k, s)
    Ho, Wo = q.shape[-2:]
    he, we = s * (Ho - 1) + 1, s * (Wo - 1) + 1
    out = attn[:, 0:1] * vp[:, :, 0:he:s, 0:we:s]
    for t in range(1, k * k):
        a, b = t // k, t % k
        out = out + attn[:, t:t + 1] * vp[:, :, a:a + he:s, b:b + we:s]
    return out


def _window_softmax(q: Tensor, kp: Tensor, mask: Tensor | None, k: int, s: int) -> Tensor:
    """Attention weights [B', k², Ho, Wo] of `_window_attn` (window offsets in row-major order)."""
    Ho, Wo = q.shape[-2:]
    he, we = s * (Ho - 1) + 1, s * (Wo - 1) + 1
    logits = []
    for a in range(k):
        for b in range(k):
            logits.append(torch.linalg.vecdot(q, kp[:, :, a:a + he:s, b:b + we:s], dim=1))
    scores = torch.stack(logits, 1)
    if mask is None:
        return torch.softmax(scores, dim=1)
    return masked_softmax_fp32(scores, mask, dim=1)


class _WindowAttn(torch.autograd.Function):
    """`_window_attn` with a backward that accumulates the window gradients in place into the padded key and value
    gradients (autograd of the slices would form k² padded-size maps)."""

    @staticmethod
    def forward(ctx, q: Tensor, kp: Tensor, vp: Tensor, mask: Tensor | None, k: int, s: int) -> Tensor:
        attn = _window_softmax(q, kp, mask, k, s)
        Ho, Wo = q.shape[-2:]
        he, we = s * (Ho - 1) + 1, s * (Wo - 1) + 1
        out = attn[:, 0:1] * vp[:, :, 0:he:s, 0:we:s]
        for t in range(1, k * k):
            a, b = t // k, t % k
            out.addcmul_(attn[:, t:t + 1], vp[:, :, a:a + he:s, b:b + we:s])
        ctx.save_for_backward(q, kp, vp, attn)
        ctx.k, ctx.s = k, s
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, kp, vp, attn = ctx.saved_tensors
        k, s = ctx.k, ctx.s
        Ho, Wo = q.shape[-2:]
        he, we = s * (Ho - 1) + 1, s * (Wo - 1) + 1
        windows = [(a, b) for a in range(k) for b in range(k)]
        dattn = torch.stack([torch.linalg.vecdot(dout, vp[:, :, a:a + he:s, b:b + we:s], dim=1)
                             for a, b in windows], 1)
        dscore = attn * (dattn - (attn * dattn).sum(1, keepdim=True))  # softmax backward; 0 at masked keys
        dq = dkp = dvp = None
        if ctx.needs_input_grad[0]:
            dq = torch.zeros_like(q)
            for t, (a, b) in enumerate(windows):
                dq.addcmul_(dscore[:, t:t + 1], kp[:, :, a:a + he:s, b:b + we:s])
        if ctx.needs_input_grad[1]:
            dkp = torch.zeros_like(kp)
            for t, (a, b) in enumerate(windows):
                dkp[:, :, a:a + he:s, b:b + we:s].addcmul_(dscore[:, t:t + 1], q)
        if ctx.needs_input_grad[2]:
            dvp = torch.zeros_like(vp)
            for t, (a, b) in enumerate(windows):
                dvp[:, :, a:a + he:s, b:b + we:s].addcmul_(attn[:, t:t + 1], dout)
        return dq, dkp, dvp, None, None, None


@register(
    'acmix', paper='On the Integration of Self-Attention and Convolution', arxiv='2111.14556', year=2022,
    family='local', complexity='O(N·(k_att² + k_conv²)·C)',
)
class ACmix(nn.Module):
    """ACmix: α · (local self-attention) + β · (shift convolution) over shared 1×1 q/k/v projections.

    Args:
        channels: input channels C.
        out_channels: output channels (default C); divisible by ``num_heads``.
        kernel_att: window k_att of the attention path (odd, default 7).
        num_heads: heads N (default 4).
        kernel_conv: kernel k_conv of the convolution path (odd, default 3).
        stride: output stride s (default 1): both paths are evaluated at every s-th pixel.
        pad_mode: ``'reflect'`` (default, the released code's reflection-padded window) or ``'mask'`` (keys outside
            the map get no weight).
        learnable_shift: the shift kernels of ``dep_conv`` are trained (default True, as the released code) or fixed.
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, out_channels, ceil(H / s), ceil(W / s)].
    """

    def __init__(
            self,
            channels: int,
            out_channels: int | None = None,
            *,
            kernel_att: int = 7,
            num_heads: int = 4,
            kernel_conv: int = 3,
            stride: int = 1,
            pad_mode: str = 'reflect',
            learnable_shift: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.out_channels = check_channels(out_channels if out_channels is not None else channels, 'out_channels')
        self.kernel_att = check_odd('kernel_att', kernel_att)
        self.kernel_conv = check_odd('kernel_conv', kernel_conv)
        self.num_heads = check_int('num_heads', num_heads)
        self.stride = check_int('stride', stride)
        if self.out_channels % num_heads:
            raise ValueError(f'out_channels={self.out_channels} must be divisible by num_heads={num_heads}')
        if pad_mode not in PAD_MODES:
            raise ValueError(f'pad_mode must be one of {PAD_MODES}, got {pad_mode!r}')
        self.pad_mode = pad_mode
        self.head_dim = self.out_channels // num_heads
        Co, D, kc = self.out_channels, self.head_dim, kernel_conv
        self.rate1 = nn.Parameter(torch.empty(1, **dd))  # α
        self.rate2 = nn.Parameter(torch.empty(1, **dd))  # β
        self.conv1 = nn.Conv2d(channels, Co, 1, **dd)  # q
        self.conv2 = nn.Conv2d(channels, Co, 1, **dd)  # k
        self.conv3 = nn.Conv2d(channels, Co, 1, **dd)  # v
        self.conv_p = nn.Conv2d(2, D, 1, **dd)  # positional encoding of the (x, y) coordinates
        self.fc = nn.Conv2d(3 * num_heads, kc * kc, 1, bias=False, **dd)
        self.dep_conv = nn.Conv2d(kc * kc * D, Co, kc, stride=stride, padding=kc // 2, groups=D, **dd)
        self.dep_conv.weight.requires_grad_(learnable_shift)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As the released code: α = β = 0.5, default 1×1 convolutions, one-hot shift kernels and zero bias."""
        nn.init.constant_(self.rate1, 0.5)
        nn.init.constant_(self.rate2, 0.5)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv_p, self.fc):
            conv.reset_parameters()
        kc = self.kernel_conv
        with torch.no_grad():
            shift = torch.eye(kc * kc, device=self.dep_conv.weight.device, dtype=self.dep_conv.weight.dtype)
            self.dep_conv.weight.copy_(shift.view(1, kc * kc, kc, kc).expand_as(self.dep_conv.weight))
        nn.init.zeros_(self.dep_conv.bias)

    def positional_encoding(self, H: int, W: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``pe = conv_p((x, y))`` with x = linspace(-1, 1, W) along columns and y = linspace(-1, 1, H) along rows:
        [D, H, W]."""
        w = self.conv_p.weight.to(dtype).flatten(1)  # [D, 2]
        loc_x = torch.linspace(-1.0, 1.0, W, dtype=dtype, device=device)
        loc_y = torch.linspace(-1.0, 1.0, H, dtype=dtype, device=device)
        pe = w[:, 0, None, None] * loc_x[None, None, :] + w[:, 1, None, None] * loc_y[None, :, None]
        bias = self.conv_p.bias
        if bias is not None:
            pe = pe + bias.to(dtype)[:, None, None]
        return pe

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'ACmix')
        B, _, H, W = x.shape
        N, D, k, s = self.num_heads, self.head_dim, self.kernel_att, self.stride
        p = k // 2
        Ho, Wo = (H - 1) // s + 1, (W - 1) // s + 1
        weight = torch.cat([self.conv1.weight, self.conv2.weight, self.conv3.weight])
        b1, b2, b3 = self.conv1.bias, self.conv2.bias, self.conv3.bias
        bias: Tensor | None = None
        if b1 is not None and b2 is not None and b3 is not None:
            bias = torch.cat([b1, b2, b3])
        qkv = F.conv2d(x, weight, bias)  # [B, 3·N·D, H, W], channels (q | k | v, head, d)

        # self-attention path, computed in at least float32
        ct = torch.promote_types(x.dtype, torch.float32)
        q, key, v = qkv.to(ct).view(B, 3, N, D, H, W).unbind(1)
        pe = self.positional_encoding(H, W, ct, x.device)
        q = q[:, :, :, ::s, ::s].reshape(B * N, D, Ho, Wo) * D ** -0.5
        key = (key - pe).reshape(B * N, D, H, W)  # q·pe_ij is constant over the window: softmax drops it
        v = v.reshape(B * N, D, H, W)
        if self.pad_mode == 'reflect':
            key, v = _reflect_pad(key, p), _reflect_pad(v, p)
        else:
            key, v = F.pad(key, (p, p, p, p)), F.pad(v, (p, p, p, p))
        mask: Tensor | None = None
        if self.pad_mode == 'mask':
            valid = F.pad(x.new_ones(1, 1, H, W, dtype=torch.bool), (p, p, p, p))
            windows = []
            for a in range(k):
                for b in range(k):
                    windows.append(valid[:, 0, a:a + s * (Ho - 1) + 1:s, b:b + s * (Wo - 1) + 1:s])
            mask = torch.stack(windows, 1)  # [1, k², Ho, Wo]
        if not torch.jit.is_scripting() and not is_compiling() and needs_grad([q, key, v]):
            out_att = _WindowAttn.apply(q, key, v, mask, k, s)
        else:
            out_att = _window_attn(q, key, v, mask, k, s)
        out_att = out_att.view(B, N * D, Ho, Wo).to(x.dtype)

        # convolution path: the fully connected layer over the 3N features of each head channel, then the shifts
        kc = self.kernel_conv
        f = torch.einsum('tc,bcdl->bdtl', self.fc.weight.flatten(1), qkv.view(B, 3 * N, D, H * W))
        out_conv = self.dep_conv(f.reshape(B, D * kc * kc, H, W))
        return self.rate1 * out_att + self.rate2 * out_conv
