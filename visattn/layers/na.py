"""Neighbourhood attention (NAT) and its dilated form (DiNAT).

Papers: "Neighborhood Attention Transformer", Hassani, Walton, Li, Li, Shi, CVPR 2023, arXiv:2204.07143
(https://arxiv.org/abs/2204.07143); "Dilated Neighborhood Attention Transformer", Hassani, Shi, 2022,
arXiv:2209.15001 (https://arxiv.org/abs/2209.15001).

With ``[q, k, v] = x W_qkv + b_qkv`` split into N heads of d = C/N channels, every pixel ``i`` attends to the
k×k neighbourhood ``ρ(i)`` of keys (every ``dilation``-th position, the window shifted inwards at the borders so
that it always holds k×k keys: NATTEN's rule, see ``visattn.ops.neighborhood_attention_2d``):

    NA(i) = softmax_{j ∈ ρ(i)}(s · q_i·k_j + B[j - i]) v_j,      y = NA(x) W_proj + b_proj

``s`` is ``qk_scale`` (default d^-1/2) and ``B`` NAT's relative position bias ``rpb`` [N, 2k-1, 2k-1], indexed by
the offset in window steps, ``(j - i)/dilation + k - 1`` per axis (trunc-normal init, std 0.02, as NAT). The
parameters are named as NATTEN's ``NeighborhoodAttention2D`` (``qkv``, ``rpb``, ``proj``: Linear layers over
channels), so NAT's and DiNAT's weights load as they are. The attention runs on
``visattn.ops.neighborhood_attention_2d`` (Triton kernels on CUDA, the PyTorch path elsewhere).

Maps smaller than the window. The op needs ``H // dilation >= k`` and ``W // dilation >= k``. By default
(``pad_mode='zeros'``) the input is zero-padded at the bottom/right to ``k·dilation`` rows/columns where it is
smaller, before the qkv projection, and the output cropped before ``proj``: the released NAT/DiNAT code (NATTEN's
``NeighborhoodAttention2D`` up to v0.14). The padded pixels are then keys and values (their projection is the qkv
bias). ``pad_mode='mask'`` masks them out instead: along a short axis each query attends to the valid positions of
its residue class (the whole class, since the padded window covers it), through a PyTorch path with an explicit
key mask (no Triton there; it is only taken for maps smaller than the window). Both modes are the same function on
maps of at least ``k·dilation`` per side. Off CUDA a padded map takes that PyTorch path in both modes, computing
only the H×W queries that are kept (the op would compute every query of the padded map: 12× as many for DiNAT's
first stage at 64×64 input); on CUDA the zero-padded map goes to the op's Triton kernels.

Attention dropout needs the attention weights, which the fused op never forms: with ``attn_drop > 0`` in training
the block takes the PyTorch path (as NATTEN's unfused path does); NAT and DiNAT train with ``attn_drop = 0``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_channels, check_float, check_int, check_nchw, check_odd, check_prob, masked_softmax_fp32
from ..ops import neighborhood_attention_2d
from ..registry import register

__all__ = ['NeighborhoodAttn', 'NeighborhoodAttnNHWC', 'neighborhood_attention_2d_masked']

PAD_MODES = ('zeros', 'mask')


def _window_rows(length: int, kernel_size: int, dilation: int, device: torch.device) -> Tensor:
    """``visattn.ops.neighborhood.window_index`` with typed arguments (TorchScript): [length, k] key rows of each
    query row, NATTEN's borders inside the query's residue class."""
    i = torch.arange(length, device=device)
    r = i % dilation
    g = (length - r + dilation - 1) // dilation  # size of the class
    start = torch.minimum((i // dilation - kernel_size // 2).clamp(min=0), g - kernel_size)
    return r[:, None] + dilation * (start[:, None] + torch.arange(kernel_size, device=device))


def neighborhood_attention_2d_masked(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        kernel_size: int,
        dilation: int,
        rpb: Tensor | None,
        scale: float,
        height: int,
        width: int,
        mask_padded: bool = True,
        attn_drop: float = 0.,
        training: bool = False,
) -> Tensor:
    """Neighbourhood attention of the queries ``[:height, :width]`` of a (padded) map, NATTEN's windows on the whole
    map, with ``mask_padded`` the keys outside ``[:height, :width]`` masked out: the PyTorch path of
    `NeighborhoodAttn` (TorchScript, padded maps off CUDA, ``pad_mode='mask'``, attention dropout). One gathered key
    per query and window offset at a time (memory O(H·W·(d + k²)), as the op's naive path), and only the queries
    that are kept.

    Args:
        q, k: [B, N, Hs, Ws, Dk] with ``Hs // dilation >= kernel_size`` and ``Ws // dilation >= kernel_size``.
        v: [B, N, Hs, Ws, Dv].
        kernel_size, dilation: the window (odd k) and the step between its positions.
        rpb: [N, 2k-1, 2k-1] relative position bias, or None.
        scale: factor on q·k.
        height, width: the valid part of the map: the queries computed.
        mask_padded: mask the keys outside ``[:height, :width]`` (else they are keys like any other).
        attn_drop: dropout rate on the attention weights, applied when ``training``.
        training: apply ``attn_drop``.

    Returns:
        [B, N, height, width, Dv] in ``q``'s dtype (softmax and sums in at least float32).
    """
    hs, ws = q.shape[2], q.shape[3]
    ct = torch.promote_types(q.dtype, torch.float32)
    iy = _window_rows(hs, kernel_size, dilation, q.device)[:height]  # [height, k]
    ix = _window_rows(ws, kernel_size, dilation, q.device)[:width]  # [width, k]
    qf = q[:, :, :height, :width].to(ct) * scale
    kf, vf = k.to(ct), v.to(ct)
    logits: list[Tensor] = []
    for a in range(kernel_size):
        for b in range(kernel_size):
            # the key at window offset (a, b) of every query: [B, N, height, width, Dk]
            logits.append((qf * kf[:, :, iy[:, a].unsqueeze(1), ix[:, b].unsqueeze(0)]).sum(-1))
    scores = torch.stack(logits, -1)  # [B, N, height, width, k²]
    if rpb is not None:
        ry = torch.div(iy - torch.arange(height, device=q.device)[:, None], dilation, rounding_mode='floor')
        rx = torch.div(ix - torch.arange(width, device=q.device)[:, None], dilation, rounding_mode='floor')
        ry, rx = ry + kernel_size - 1, rx + kernel_size - 1
        scores = scores + rpb[:, ry[:, None, :, None], rx[None, :, None, :]].flatten(-2).to(ct)  # [N, h, w, k²]
    if mask_padded and (height < hs or width < ws):
        valid = (iy < height)[:, None, :, None] & (ix < width)[None, :, None, :]  # [height, width, k, k]
        p = masked_softmax_fp32(scores, valid.flatten(-2))
    else:
        p = torch.softmax(scores, dim=-1)
    if training and attn_drop > 0.:
        p = F.dropout(p, attn_drop, True)
    out = torch.zeros(q.shape[0], q.shape[1], height, width, v.shape[-1], dtype=ct, device=q.device)
    for a in range(kernel_size):
        for b in range(kernel_size):
            t = a * kernel_size + b
            out = out + p[..., t, None] * vf[:, :, iy[:, a].unsqueeze(1), ix[:, b].unsqueeze(0)]
    return out.to(q.dtype)


@register(
    'na', paper='Neighborhood Attention Transformer', arxiv='2204.07143', year=2022, family='local',
    complexity='O(N·k²·C)', backends=('torch', 'triton'),
)
class NeighborhoodAttn(nn.Module):
    """NAT's neighbourhood attention layer (DiNAT's with ``dilation > 1``), on NCHW maps.

    Args:
        channels: input and output channels C (divisible by ``num_heads``).
        num_heads: attention heads N (default 8).
        kernel_size: odd window size k (default 7, NAT's and DiNAT's).
        dilation: step between window positions (default 1: NAT; DiNAT alternates 1 and a per-stage dilation).
        rel_pos_bias: learn NAT's relative position bias ``rpb`` [N, 2k-1, 2k-1] (default True).
        qkv_bias: bias in the qkv projection (default True, as NAT).
        qk_scale: factor on q·k (default None: d^-1/2).
        attn_drop: dropout on the attention weights (default 0; > 0 in training takes the PyTorch path).
        proj_drop: dropout after the output projection (default 0).
        pad_mode: maps smaller than ``k·dilation`` per side: ``'zeros'`` (default, NAT's released code: zero-pad
            the input at the bottom/right before the projection, crop the output) or ``'mask'`` (the padded keys
            are masked out).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W] (any H, W); `forward_nhwc`: [B, H, W, C] -> [B, H, W, C].
    """

    def __init__(
            self,
            channels: int,
            *,
            num_heads: int = 8,
            kernel_size: int = 7,
            dilation: int = 1,
            rel_pos_bias: bool = True,
            qkv_bias: bool = True,
            qk_scale: float | None = None,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            pad_mode: str = 'zeros',
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        check_int('num_heads', num_heads)
        if channels % num_heads:
            raise ValueError(f'channels={channels} must be divisible by num_heads, got num_heads={num_heads}')
        if pad_mode not in PAD_MODES:
            raise ValueError(f'pad_mode must be one of {PAD_MODES}, got {pad_mode!r}')
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.kernel_size = check_odd('kernel_size', kernel_size)
        self.dilation = check_int('dilation', dilation)
        self.scale = self.head_dim ** -0.5 if qk_scale is None else check_float(
            'qk_scale', qk_scale, 0., None, low_open=True)
        self.attn_drop_rate = check_prob('attn_drop', attn_drop)
        self.pad_mode = pad_mode
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias, **dd)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1, **dd))
            nn.init.trunc_normal_(self.rpb, std=0.02, a=-2., b=2.)
        else:
            self.register_parameter('rpb', None)
        self.proj = nn.Linear(channels, channels, **dd)
        self.proj_drop = nn.Dropout(check_prob('proj_drop', proj_drop))

    def extra_repr(self) -> str:
        return (f'channels={self.channels}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, '
                f'dilation={self.dilation}, rel_pos_bias={self.rpb is not None}, pad_mode={self.pad_mode!r}')

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'NeighborhoodAttn')
        return self.forward_nhwc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_nhwc(self, x: Tensor) -> Tensor:
        """The layer on a channels-last map (NAT's layout): [B, H, W, C] -> [B, H, W, C]."""
        B, H, W, C = x.shape
        N, ks, d = self.num_heads, self.kernel_size, self.dilation
        size = ks * d  # the op needs k positions of every residue class: H // d >= k
        pad_h, pad_w = max(size - H, 0), max(size - W, 0)
        padded = pad_h > 0 or pad_w > 0
        if padded:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        # [B, Hp, Wp, 3C] -> 3 × [B, N, Hp, Wp, d]
        q, k, v = self.qkv(x).view(B, Hp, Wp, 3, N, self.head_dim).permute(3, 0, 4, 1, 2, 5).unbind(0)
        rpb = self.rpb
        if rpb is not None:
            rpb = rpb.to(q.dtype)
        drop = self.training and self.attn_drop_rate > 0.
        # the PyTorch path computes only the H×W queries kept: on a padded map it does less work than the op, whose
        # Triton kernels take the whole padded map on CUDA
        if torch.jit.is_scripting() or drop or (padded and (self.pad_mode == 'mask' or not q.is_cuda)):
            out = neighborhood_attention_2d_masked(q, k, v, ks, d, rpb, self.scale, H, W, self.pad_mode == 'mask',
                                                   self.attn_drop_rate, self.training)
        else:
            out = neighborhood_attention_2d(q, k, v, kernel_size=ks, dilation=d, rpb=rpb, scale=self.scale)
        out = out.permute(0, 2, 3, 1, 4).reshape(B, out.shape[2], out.shape[3], C)[:, :H, :W]
        return self.proj_drop(self.proj(out))


class NeighborhoodAttnNHWC(NeighborhoodAttn):
    """`NeighborhoodAttn` on channels-last maps: ``forward`` is `forward_nhwc` (the layer of the NAT/DiNAT models).
    A class of its own so that timm's ``torch.fx`` tracer keeps it a leaf module, as every visattn block.

    Shapes:
        x: [B, H, W, C] -> [B, H, W, C].
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-1] != self.channels:
            raise ValueError(f'NeighborhoodAttnNHWC: x must be [B, H, W, {self.channels}], got shape {list(x.shape)}')
        return self.forward_nhwc(x)
