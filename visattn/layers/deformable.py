"""Deformable multi-head attention (DAT): every query attends to keys sampled at learned offsets of a reference grid.

Paper: "Vision Transformer with Deformable Attention", Xia, Pan, Song, Li, Huang, CVPR 2022, arXiv:2201.00520
(https://arxiv.org/abs/2201.00520). Released code: LeapLabTHU/DAT, ``models/dat_blocks.py``, class
``DAttentionBaseline`` as released with the CVPR paper (commit 42b489e; DAT++ later changed the grid normalisation);
this module keeps its parameter names (``proj_q``, ``proj_k``, ``proj_v``, ``proj_out``, ``conv_offset``,
``rpe_table``), so that its state dict loads as it is.

With ``q = W_q x`` (1×1 conv with bias), the G groups of C/G channels share one set of sampling points each:

    reference p_ij = ((2i + 1) / H_k - 1, (2j + 1) / W_k - 1),  i < H_k = ceil(H / r), j < W_k = ceil(W / r)
    Δp = s · tanh(θ_offset(q_g)) · (1 / H_k, 1 / W_k)        (s = ``offset_range_factor``, (y, x) order)
    x̃_g = φ(x_g; p + Δp)                                      (bilinear, ``grid_sample(align_corners=True)``,
                                                                zeros outside the map)
    k = W_k x̃,  v = W_v x̃,  z_m = softmax_n(q_m · k_n / sqrt(d) + B(q̂_m - (p + Δp)_n)) v_n,  y = W_o z

in normalised coordinates ([-1, 1] spans the map). The offset network θ_offset is the released one: a depthwise
``kernel_size`` × ``kernel_size`` conv with stride r (padding k // 2, so H_k = ceil(H / r) for every H), LayerNorm over
channels, GELU, and a 1×1 conv without bias to the two offsets (y, x). Head n belongs to group ``n // (N / G)``.

Deformable relative position bias ``B``: a table ``rpe_table`` [N, 2·H0 - 1, 2·W0 - 1] (``feat_size = (H0, W0)``)
sampled bilinearly (``align_corners=True``, zeros outside) at ``(q̂_m - p_n) / 2``, where ``q̂`` are the query
positions ``((2i + 1) / H - 1, (2j + 1) / W - 1)``, as the released code. The released code builds the table for the
training map and reshapes it with the map seen (so it only runs at that size); the displacement being normalised,
the same table is sampled at any H × W here: at H × W = feat_size this is the released bias exactly, at another size
it is the table interpolated to that size's displacements. ``use_pe=False`` leaves the bias out.

The attention is dense over the H_k·W_k sampled keys (the bias has that size too: [B, N, H·W, H_k·W_k]); it runs
in ``F.scaled_dot_product_attention`` on a GPU and as one ``baddbmm``, softmax and matmul on a CPU, in at least
float32 (sampling points, bilinear samples and softmax; 16-bit inputs are cast up there).

Defaults, from the released configurations (DAT-T/S/B, stage 3, the stage holding most deformable blocks): offset
range factor s = 2, r = 1, 4 heads per group, head width 32 there (here ``num_heads=8``, ``n_groups=2``), offset
kernel 5 (the stage-3 entry of the released ``ksizes = [9, 7, 5, 3]``), ``use_pe=True``, table for a 14 × 14 map
(stage 3 at 224²), ``rpe_table ~ trunc_normal(std=0.01)``, PyTorch's default initialisation elsewhere (the released
model's own init loop touches nothing). ``stride`` is the offset network's r: the output has the input's size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_channels, check_float, check_int, check_nchw, check_odd
from ..registry import register

__all__ = ['DeformableAttn']


class LayerNormProxy(nn.Module):
    """LayerNorm over the channels of a [B, C, H, W] map (the released module: its ``norm`` key)."""

    def __init__(self, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def reference_points(H: int, W: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Cell centres of an H × W grid in normalised (y, x) coordinates: [H, W, 2], ``(2i + 1) / H - 1``."""
    ys = (2 * torch.arange(H, dtype=dtype, device=device) + 1) / H - 1
    xs = (2 * torch.arange(W, dtype=dtype, device=device) + 1) / W - 1
    return torch.stack([ys[:, None].expand(H, W), xs[None, :].expand(H, W)], -1)


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, fused: bool) -> Tensor:
    """``softmax(scale · q kᵀ + bias) v`` for q [B, N, M, D], k and v [B, N, Ns, D], bias [B, N, M, Ns] or None:
    ``F.scaled_dot_product_attention`` where ``fused`` (on a GPU its kernels take the bias), else the same math as
    one ``baddbmm``, softmax and matmul (fewer passes than SDPA's CPU path with a float mask)."""
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    if bias is None:
        logits = q @ k.transpose(-1, -2) * scale
    else:
        B, N, M, Ns = bias.shape
        D = q.shape[-1]
        logits = torch.baddbmm(bias.reshape(B * N, M, Ns), q.reshape(B * N, M, D),
                               k.reshape(B * N, Ns, D).transpose(-1, -2), alpha=scale).view(B, N, M, Ns)
    return torch.softmax(logits, dim=-1) @ v


def _feat_size(feat_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(feat_size, (tuple, list)):
        if len(feat_size) != 2:
            raise ValueError(f'feat_size must be an int or a pair (H, W), got {feat_size!r}')
        return check_int('feat_size', feat_size[0]), check_int('feat_size', feat_size[1])
    size = check_int('feat_size', feat_size)
    return size, size


@register(
    'deformable', paper='Vision Transformer with Deformable Attention', arxiv='2201.00520', year=2022,
    family='local', complexity='O(N·(N/r²)·C)',
)
class DeformableAttn(nn.Module):
    """DAT's deformable multi-head attention (``DAttentionBaseline``) on a [B, C, H, W] map.

    Args:
        channels: channels C, divisible by ``num_heads``.
        num_heads: heads N (default 8); divisible by ``n_groups``.
        n_groups: offset groups G (default 2): the channels of a group share one set of sampling points.
        stride: stride r of the offset network (default 1): ceil(H / r) × ceil(W / r) sampled keys.
        offset_range_factor: s > 0 (default 2): offsets are at most s / H_k (rows) and s / W_k (columns) in
            normalised coordinates, i.e. s / 2 reference cells.
        kernel_size: depthwise kernel of the offset network (odd, default 5).
        use_pe: add the deformable relative position bias (default True).
        feat_size: map size (H0, W0) the relative table is built for (default 14); any size runs.
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
            self,
            channels: int,
            *,
            num_heads: int = 8,
            n_groups: int = 2,
            stride: int = 1,
            offset_range_factor: float = 2.0,
            kernel_size: int = 5,
            use_pe: bool = True,
            feat_size: int | tuple[int, int] = 14,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.num_heads = check_int('num_heads', num_heads)
        self.n_groups = check_int('n_groups', n_groups)
        self.stride = check_int('stride', stride)
        self.offset_range_factor = check_float('offset_range_factor', offset_range_factor, 0., None, low_open=True)
        self.kernel_size = check_odd('kernel_size', kernel_size)
        self.feat_size = _feat_size(feat_size)
        if channels % num_heads:
            raise ValueError(f'channels={channels} must be divisible by num_heads={num_heads}')
        if num_heads % n_groups:
            raise ValueError(f'num_heads={num_heads} must be divisible by n_groups={n_groups}')
        self.use_pe = bool(use_pe)
        self.head_dim = channels // num_heads
        self.group_channels = channels // n_groups
        Cg = self.group_channels
        self.conv_offset = nn.Sequential(
            nn.Conv2d(Cg, Cg, kernel_size, stride, kernel_size // 2, groups=Cg, **dd),
            LayerNormProxy(Cg, **dd),
            nn.GELU(),
            nn.Conv2d(Cg, 2, 1, bias=False, **dd),
        )
        self.proj_q = nn.Conv2d(channels, channels, 1, **dd)
        self.proj_k = nn.Conv2d(channels, channels, 1, **dd)
        self.proj_v = nn.Conv2d(channels, channels, 1, **dd)
        self.proj_out = nn.Conv2d(channels, channels, 1, **dd)
        H0, W0 = self.feat_size
        self.rpe_table = nn.Parameter(torch.empty(num_heads, 2 * H0 - 1, 2 * W0 - 1, **dd)) if self.use_pe else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's defaults for the convolutions and the LayerNorm; ``rpe_table ~ trunc_normal(std=0.01)``."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.LayerNorm)):
                m.reset_parameters()
        if self.rpe_table is not None:
            nn.init.trunc_normal_(self.rpe_table, std=0.01)

    def _points(self, q: Tensor, ct: torch.dtype) -> Tensor:
        """Sampling points p + Δp of each group: [B·G, H_k, W_k, 2] in normalised (y, x) coordinates."""
        B, _, H, W = q.shape
        offset = self.conv_offset(q.reshape(B * self.n_groups, self.group_channels, H, W)).to(ct)
        Hk, Wk = offset.shape[-2:]
        offset = offset.tanh()
        s = self.offset_range_factor
        offset = torch.stack([offset[:, 0] * (s / Hk), offset[:, 1] * (s / Wk)], -1)  # [B·G, H_k, W_k, 2]
        return offset + reference_points(Hk, Wk, ct, q.device)

    def sampling_points(self, x: Tensor) -> Tensor:
        """The deformed sampling points p + Δp: [B, G, H_k, W_k, 2] in normalised (y, x) coordinates."""
        check_nchw(x, self.channels, 'DeformableAttn')
        ct = torch.promote_types(x.dtype, torch.float32)
        pos = self._points(self.proj_q(x), ct)
        return pos.view(x.shape[0], self.n_groups, pos.shape[1], pos.shape[2], 2)

    def relative_bias(self, pos: Tensor, H: int, W: int) -> Tensor | None:
        """The deformable relative position bias ``B(q̂_m - p_n)`` of every head: [B, N, H·W, H_k·W_k] (None when
        ``use_pe=False``), from the sampling points ``pos`` [B·G, H_k, W_k, 2] and the query map size H × W."""
        table = self.rpe_table
        if table is None:
            return None
        G, N = self.n_groups, self.num_heads
        BG, Hk, Wk = pos.shape[0], pos.shape[1], pos.shape[2]
        # (q̂_m - p_n) / 2 for every query m and sampling point n of the group, as (x, y) for grid_sample
        q_hat = reference_points(H, W, pos.dtype, pos.device).flip(-1).view(1, H * W, 1, 2) * 0.5
        disp = q_hat - pos.flip(-1).view(BG, 1, Hk * Wk, 2) * 0.5  # [B·G, HW, Ns, 2]
        Th, Tw = table.shape[-2], table.shape[-1]
        rpe = table.to(pos.dtype).view(1, G, N // G, Th, Tw).expand(BG // G, -1, -1, -1, -1)
        bias = F.grid_sample(rpe.reshape(BG, N // G, Th, Tw), disp, mode='bilinear', padding_mode='zeros',
                             align_corners=True)  # [B·G, N/G, HW, Ns]
        return bias.view(BG // G, N, H * W, Hk * Wk)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'DeformableAttn')
        B, C, H, W = x.shape
        G, N, D = self.n_groups, self.num_heads, self.head_dim
        ct = torch.promote_types(x.dtype, torch.float32)
        q = self.proj_q(x)
        pos = self._points(q, ct)  # [B·G, H_k, W_k, 2]
        Hk, Wk = pos.shape[1], pos.shape[2]
        grid = pos.flip(-1)  # grid_sample takes (x, y)
        sampled = F.grid_sample(x.reshape(B * G, C // G, H, W).to(ct), grid, mode='bilinear', padding_mode='zeros',
                                align_corners=True)  # [B·G, C/G, H_k, W_k]
        sampled = sampled.reshape(B, C, Hk, Wk).to(x.dtype)
        k = self.proj_k(sampled).reshape(B, N, D, Hk * Wk).transpose(-1, -2).to(ct)  # [B, N, Ns, D]
        v = self.proj_v(sampled).reshape(B, N, D, Hk * Wk).transpose(-1, -2).to(ct)
        qh = q.reshape(B, N, D, H * W).transpose(-1, -2).to(ct)  # [B, N, HW, D]
        bias = self.relative_bias(pos, H, W)  # [B, N, HW, Ns] or None
        out = attend(qh, k, v, bias, D ** -0.5, fused=x.is_cuda)  # [B, N, HW, D]
        out = out.transpose(-1, -2).reshape(B, C, H, W).to(x.dtype)
        return self.proj_out(out)
