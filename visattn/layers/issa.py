"""Interlaced sparse self-attention (ISANet).

Paper: "Interlaced Sparse Self-Attention for Semantic Segmentation", Huang, Yuan, Guo, Zhang, Chen, Wang,
arXiv:1907.12273, 2019 (https://arxiv.org/abs/1907.12273). Released code: openseg.pytorch
(``lib/models/modules/isa_block.py``); mmsegmentation's ``ISAHead`` (``isa_head.py``) is followed here.

The dense affinity over all H·W positions is factorised into two sparse ones. With the map cut into blocks of
``P_h × P_w = down_factor`` pixels (``Q_h × Q_w`` blocks, H = P_h·Q_h), the long-range step attends among the
positions of equal offset inside their blocks (one group per offset, ``Q_h·Q_w`` positions sampled with stride P),
and the short-range step among the positions of one block; each position thus reaches every other in two steps.
Each step is a self-attention block as mmseg's ``SelfAttentionBlock`` of the ISA head:

    q = φ_q(x), k = φ_k(x)   (two 1×1 conv-BN-ReLU each, to C_k channels),   v = W_v x + b_v   (C channels),
    y_i = ReLU(BN(W_o Σ_{j ∈ group(i)} softmax_j(q_iᵀ k_j / sqrt(C_k)) v_j)),

the long-range step's output feeding the short-range step. There is no residual: the ISA head concatenates the result
with its input (see `visattn.seg.ISAHead`). Defaults as mmseg: down_factor (8, 8), C_k = C/2 (isa_channels 256 of a
512-channel head). The released openseg block differs only in having no bias on the value conv.

Any H × W: the map is zero-padded to multiples of the down factor (split evenly on both sides, as the released code)
and the padded positions are masked out as keys in both steps (the released code lets them take part); the
projections run on the real positions only (so that no padding enters the batch statistics), and each step's output
is cropped before its output projection.
Each step runs in ``scaled_dot_product_attention`` over [B, groups, positions, C_k]. Cost O(N·(N/P + P)·C), P the
block size (P_h·P_w).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_channels, check_int, check_nchw, conv_norm_act, reduced_channels
from ..registry import register

__all__ = ['InterlacedSparseSelfAttn']


def _group(t: Tensor, ph: int, pw: int, glb_h: int, glb_w: int, local: bool) -> Tensor:
    """[B, c, Hp, Wp] -> [B, groups, positions, c]: the long-range groups (one per offset (a, b) inside the P_h × P_w
    blocks, positions (a + P_h·i, b + P_w·j)) or the short-range ones (one per block)."""
    b, c = t.shape[:2]
    t = t.view(b, c, glb_h, ph, glb_w, pw)
    if local:
        return t.permute(0, 2, 4, 3, 5, 1).reshape(b, glb_h * glb_w, ph * pw, c)
    return t.permute(0, 3, 5, 2, 4, 1).reshape(b, ph * pw, glb_h * glb_w, c)


def _ungroup(t: Tensor, ph: int, pw: int, glb_h: int, glb_w: int, local: bool) -> Tensor:
    """Inverse of `_group`: [B, groups, positions, c] -> [B, c, Hp, Wp]."""
    b, c = t.shape[0], t.shape[-1]
    if local:
        t = t.reshape(b, glb_h, glb_w, ph, pw, c).permute(0, 5, 1, 3, 2, 4)
    else:
        t = t.reshape(b, ph, pw, glb_h, glb_w, c).permute(0, 5, 3, 1, 4, 2)
    return t.reshape(b, c, glb_h * ph, glb_w * pw)


class _SelfAttention2d(nn.Module):
    """One ISA step (mmseg's ``SelfAttentionBlock`` of the ISA head: its layout and key names)."""

    def __init__(self, channels: int, key_channels: int, down_factor: tuple[int, int], local: bool,
                 norm_layer: type[nn.Module], act_layer: type[nn.Module], device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype, norm_layer=norm_layer, act_layer=act_layer)
        self.down_factor = down_factor
        self.local = local
        self.scale = key_channels ** -0.5
        self.key_project = nn.Sequential(conv_norm_act(channels, key_channels, **dd),
                                         conv_norm_act(key_channels, key_channels, **dd))
        self.query_project = nn.Sequential(conv_norm_act(channels, key_channels, **dd),
                                           conv_norm_act(key_channels, key_channels, **dd))
        self.value_project = nn.Conv2d(channels, channels, 1, device=device, dtype=dtype)
        self.output_project = conv_norm_act(channels, channels, **dd)

    def forward(self, x: Tensor, mask: Tensor | None, top: int, left: int, glb_h: int, glb_w: int) -> Tensor:
        """Attention within the groups of ``x: [B, C, H, W]`` placed at (top, left) in the padded
        ``glb_h·P_h × glb_w·P_w`` map; ``mask``: [groups, n, n] or None (no padding). The projections (and their
        batch statistics) see the real positions only; q, k and v are zero-padded, the output cropped."""
        ph, pw = self.down_factor
        h, w = x.shape[-2:]
        pad = [left, glb_w * pw - w - left, top, glb_h * ph - h - top]
        q = _group(F.pad(self.query_project(x), pad), ph, pw, glb_h, glb_w, self.local)
        k = _group(F.pad(self.key_project(x), pad), ph, pw, glb_h, glb_w, self.local)
        v = _group(F.pad(self.value_project(x), pad), ph, pw, glb_h, glb_w, self.local)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        y = _ungroup(y, ph, pw, glb_h, glb_w, self.local)
        if mask is not None:
            y = y[:, :, top:top + h, left:left + w]
        return self.output_project(y)


@register(
    'issa', paper='Interlaced Sparse Self-Attention for Semantic Segmentation', arxiv='1907.12273', year=2019,
    family='context', complexity='O(N·(N/P+P)·C)',
)
class InterlacedSparseSelfAttn(nn.Module):
    """Interlaced sparse self-attention: long-range attention among equal offsets, then short-range within blocks.

    Args:
        channels: input and output channels C.
        down_factor: the block size (P_h, P_w), also the stride of the long-range groups (default (8, 8), as mmseg);
            an int is square.
        rd_ratio, rd_channels, rd_divisor: width C_k of the query and key (default C/2, as mmseg's ISA head).
        norm_layer: the norm of every conv-norm-act (default BatchNorm2d).
        act_layer: their activation (default ReLU).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
            self,
            channels: int,
            *,
            down_factor: int | tuple[int, int] = (8, 8),
            rd_ratio: float = 1 / 2,
            rd_channels: int | None = None,
            rd_divisor: int = 1,
            norm_layer: type[nn.Module] = nn.BatchNorm2d,
            act_layer: type[nn.Module] = nn.ReLU,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        self.channels = check_channels(channels)
        if isinstance(down_factor, (tuple, list)):
            if len(down_factor) != 2:
                raise ValueError(f'down_factor must be an int or a (P_h, P_w) pair, got {down_factor!r}')
            ph, pw = check_int('down_factor', down_factor[0]), check_int('down_factor', down_factor[1])
        else:
            ph = pw = check_int('down_factor', down_factor)
        self.down_factor = (ph, pw)
        self.key_channels = reduced_channels(channels, rd_ratio, rd_channels, rd_divisor)
        dd = dict(device=device, dtype=dtype)
        self.global_relation = _SelfAttention2d(
            channels, self.key_channels, self.down_factor, False, norm_layer, act_layer, **dd)
        self.local_relation = _SelfAttention2d(
            channels, self.key_channels, self.down_factor, True, norm_layer, act_layer, **dd)

    def _mask(self, h: int, w: int, top: int, left: int, glb_h: int, glb_w: int, local: bool,
              device: torch.device) -> Tensor:
        """[groups, positions, positions] bool: a real query sees the real keys of its group; a padded query (cropped
        later) sees every key, so that no row is empty."""
        ph, pw = self.down_factor
        valid = torch.zeros(glb_h * ph, glb_w * pw, dtype=torch.bool, device=device)
        valid[top:top + h, left:left + w] = True
        valid = _group(valid.view(1, 1, glb_h * ph, glb_w * pw), ph, pw, glb_h, glb_w, local)[0, :, :, 0]  # [G, n]
        return valid.unsqueeze(1) | ~valid.unsqueeze(2)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'InterlacedSparseSelfAttn')
        h, w = x.shape[-2:]
        ph, pw = self.down_factor
        glb_h, glb_w = (h + ph - 1) // ph, (w + pw - 1) // pw
        pad_h, pad_w = glb_h * ph - h, glb_w * pw - w
        top, left = pad_h // 2, pad_w // 2
        global_mask: Tensor | None = None
        local_mask: Tensor | None = None
        if pad_h > 0 or pad_w > 0:
            global_mask = self._mask(h, w, top, left, glb_h, glb_w, False, x.device)
            local_mask = self._mask(h, w, top, left, glb_h, glb_w, True, x.device)
        x = self.global_relation(x, global_mask, top, left, glb_h, glb_w)
        return self.local_relation(x, local_mask, top, left, glb_h, glb_w)
