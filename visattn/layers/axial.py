"""Position-sensitive axial attention: self-attention along the height, then along the width.

Papers: "Axial Attention in Multidimensional Transformers", Ho, Kalchbrenner, Weissenborn, Salimans, 2019,
arXiv:1912.12180 (https://arxiv.org/abs/1912.12180); "Axial-DeepLab: Stand-Alone Axial-Attention for Panoptic
Segmentation", Wang, Zhu, Green, Adam, Yuille, Chen, ECCV 2020, arXiv:2003.07853
(https://arxiv.org/abs/2003.07853).

One axial layer attends along one axis; for an output position o and the positions p of its 1×m neighbourhood
``N_{1×m}(o)`` along that axis (Axial-DeepLab eq. 4):

    y_o = Σ_p softmax_p(q_o^T k_p + q_o^T r^q_{p-o} + k_p^T r^k_{p-o}) (v_p + r^v_{p-o})

with learned relative embeddings for the query, the key and the value (position-sensitive in q, k and v). As in
Axial-DeepLab: 8 heads; q and k get half the head width, v the full width; the projection is followed by batch
norm; the three similarity terms are batch-normalised separately (per head) before they are summed; the two
output terms (``Σ a v`` and ``Σ a r^v``) are batch-normalised separately before they are summed. The block
(`AxialAttn`) is a height layer followed by a width layer; ``stride=2`` adds a 2×2 average pooling after the
width layer, as Axial-DeepLab downsamples.

``span=None`` attends along the whole axis (any length); relative offsets up to ``feat_size - 1`` get their own
embeddings and farther ones share the outermost (Axial-DeepLab's TensorFlow implementation, DeepLab2, keeps
``feat_size = 255`` in every layer, as visattn's ``axial_resnet50`` does; its PyTorch re-implementation sizes each
layer to its feature map). ``span=m`` (odd) restricts each query to the m positions
centred on it (memory O(N·m) per axis); keys outside the image are zero-padded and masked out of the softmax.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_channels, check_int, check_nchw, check_odd, masked_softmax_fp32
from ..registry import register

__all__ = ['AxialAttn', 'AxialAttnLayer']


class AxialAttnLayer(nn.Module):
    """One position-sensitive axial-attention layer along ``axis`` (``'height'`` or ``'width'``).

    Args:
        channels: input channels C.
        out_channels: output channels (default C); divisible by ``2 * num_heads``.
        axis: ``'height'`` or ``'width'``.
        num_heads: attention heads (default 8).
        span: odd neighbourhood length m along the axis, or None for the whole axis (default).
        feat_size: with ``span=None``, offsets up to ``feat_size - 1`` have their own embeddings (default 56).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, out_channels, H, W].
    """

    def __init__(
            self,
            channels: int,
            out_channels: int | None = None,
            *,
            axis: str = 'height',
            num_heads: int = 8,
            span: int | None = None,
            feat_size: int | None = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.out_channels = check_channels(out_channels or channels, 'out_channels')
        self.num_heads = check_int('num_heads', num_heads)
        if axis not in ('height', 'width'):
            raise ValueError(f"axis must be 'height' or 'width', got {axis!r}")
        if self.out_channels % (2 * num_heads):
            raise ValueError(
                f'out_channels={self.out_channels} must be divisible by 2 * num_heads={2 * num_heads} '
                '(q and k take half of each head)')
        if span is not None:
            check_odd('span', span)
        feat_size = 56 if feat_size is None else check_int('feat_size', feat_size)
        self.axis = axis
        self.span = span
        self.head_dim = self.out_channels // num_heads
        self.reach = span // 2 if span is not None else feat_size - 1  # largest offset with its own embedding
        self.qkv = nn.Conv1d(channels, 2 * self.out_channels, 1, bias=False, **dd)
        self.bn_qkv = nn.BatchNorm1d(2 * self.out_channels, **dd)
        self.bn_similarity = nn.BatchNorm2d(3 * num_heads, **dd)
        self.bn_output = nn.BatchNorm1d(2 * self.out_channels, **dd)
        self.relative = nn.Parameter(torch.empty(2 * self.head_dim, 2 * self.reach + 1, **dd))  # [r^q; r^k; r^v]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Projection N(0, 1/C), relative embeddings N(0, 1/d_head), as the Axial-DeepLab code initialises."""
        nn.init.normal_(self.qkv.weight, std=self.channels ** -0.5)
        nn.init.normal_(self.relative, std=self.head_dim ** -0.5)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'AxialAttnLayer')
        B, C, H, W = x.shape
        # the other axis joins the batch: [B·W, C, H] for 'height', [B·H, C, W] for 'width'
        x = x.permute(0, 3, 1, 2) if self.axis == 'height' else x.permute(0, 2, 1, 3)
        n, L = x.shape[0] * x.shape[1], x.shape[-1]
        N, D = self.num_heads, self.head_dim
        qkv = self.bn_qkv(self.qkv(x.reshape(n, C, L))).view(n, N, 2 * D, L)
        q, k, v = qkv.split([D // 2, D // 2, D], dim=2)
        if self.span is None:
            pos = torch.arange(L, device=x.device)
            offset = (pos[None, :] - pos[:, None]).clamp(-self.reach, self.reach)  # [o, p] = p - o, clipped
            emb = self.relative[:, offset + self.reach].to(q.dtype)  # [2D, L, L]
            q_emb, k_emb, v_emb = emb.split([D // 2, D // 2, D], dim=0)
            logits = torch.cat([
                torch.einsum('ngco,ngcp->ngop', q, k),
                torch.einsum('ngco,cop->ngop', q, q_emb),
                torch.einsum('ngcp,cop->ngop', k, k_emb),
            ], dim=1)
            mask = torch.ones(L, L, dtype=torch.bool, device=x.device)
        else:
            # keys and values of the span around each query: [n, N, c, L, m], zero-padded; window slot j has
            # offset p - o = j - reach, so the embedding table is used as it is
            m, r = self.span, self.reach
            k, v = (F.pad(t, (r, r)).unfold(-1, m, 1) for t in (k, v))
            mask = F.pad(x.new_ones(1, L), (r, r)).unfold(-1, m, 1)[0] > 0  # [L, m]
            q_emb, k_emb, v_emb = self.relative.to(q.dtype).split([D // 2, D // 2, D], dim=0)
            logits = torch.cat([
                torch.einsum('ngco,ngcoj->ngoj', q, k),
                torch.einsum('ngco,cj->ngoj', q, q_emb),
                torch.einsum('ngcoj,cj->ngoj', k, k_emb),
            ], dim=1)
        logits = self.bn_similarity(logits).unflatten(1, (3, N)).sum(1)  # each term normalised per head, summed
        attn = masked_softmax_fp32(logits, mask).to(v.dtype)  # [n, N, L, keys]
        if self.span is None:
            sv = torch.einsum('ngop,ngcp->ngco', attn, v)
            sve = torch.einsum('ngop,cop->ngco', attn, v_emb)
        else:
            sv = torch.einsum('ngoj,ngcoj->ngco', attn, v)
            sve = torch.einsum('ngoj,cj->ngco', attn, v_emb)
        out = torch.stack([sv, sve], dim=3).reshape(n, 2 * self.out_channels, L)  # channels (head, c, term)
        out = self.bn_output(out).view(n, self.out_channels, 2, L).sum(2)
        if self.axis == 'height':
            return out.view(B, W, self.out_channels, H).permute(0, 2, 3, 1)
        return out.view(B, H, self.out_channels, W).permute(0, 2, 1, 3)


@register(
    'axial', paper='Axial-DeepLab: Stand-Alone Axial-Attention for Panoptic Segmentation', arxiv='2003.07853',
    year=2020, family='local', complexity='O(N·(H+W)·C)',
)
class AxialAttn(nn.Module):
    """Axial-attention block: a height layer, then a width layer, then optional 2×2 average pooling.

    Args:
        channels: input channels C.
        out_channels: output channels (default C); divisible by ``2 * num_heads``.
        num_heads: attention heads (default 8).
        span: odd neighbourhood length m along each axis, or None for whole axes (default).
        feat_size: with ``span=None``, the feature size (int or (H, W)) whose offsets get their own relative
            embeddings (default 56); any input size works.
        stride: 1, or s > 1 for an s×s average pooling after the width layer.
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
            span: int | None = None,
            feat_size: int | tuple[int, int] | None = None,
            stride: int = 1,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.out_channels = check_channels(out_channels or channels, 'out_channels')
        self.stride = check_int('stride', stride)
        fh, fw = feat_size if isinstance(feat_size, (tuple, list)) else (feat_size, feat_size)
        kw = dict(num_heads=num_heads, span=span, **dd)
        self.height = AxialAttnLayer(channels, self.out_channels, axis='height', feat_size=fh, **kw)
        self.width = AxialAttnLayer(self.out_channels, self.out_channels, axis='width', feat_size=fw, **kw)
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()

    def reset_parameters(self) -> None:
        self.height.reset_parameters()
        self.width.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'AxialAttn')
        return self.pool(self.width(self.height(x)))
