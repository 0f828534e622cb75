"""MUSE: self-attention, convolutions and a point-wise feed-forward layer in parallel over a shared projection.

Paper: "MUSE: Parallel Multi-Scale Attention for Sequence to Sequence Learning", Guangxiang Zhao, Xu Sun, Jingjing
Xu, Zhiyuan Zhang, Liangchen Luo, arXiv 2019, arXiv:1911.09483 (https://arxiv.org/abs/1911.09483). Code (fairseq):
https://github.com/lancopku/MUSE, now https://github.com/lancopku/Prime (``fairseq/modules/multihead_attention.py``,
``MultiheadAttention820``; ``fairseq/models/combine_transformer.py``).

One MUSE layer encodes the sequence at three scales at once and sums them:

    MUSE(x) = Attention(x) + Conv(x) + Pointwise(x)

- global: multi-head softmax attention, ``proj(softmax(q kᵀ / sqrt(D)) v)``;
- local: depth-wise separable convolutions over the tokens, on the *same* value projection v = x W_V as the
  attention (the paper's shared projection, which it finds necessary to combine the two in one semantic space),
  combined by dynamically selected kernel sizes: ``Conv(x) = Σ_i α_i PW_i(DW_{k_i}(v))`` with
  ``α = softmax(β)``, β one learned logit per kernel size (``kernel_logits``, init 0: equal weights), DW_k a
  depth-wise convolution of width k and PW_i a point-wise (``Linear(C, C)``) one;
- token-wise: the point-wise feed-forward layer ``Pointwise(x) = W_2 act(W_1 x + b_1) + b_2`` (hidden width
  ``ffn_ratio · C``, ReLU as in the code), on the same input x.

In the paper the three branches replace both sub-layers of a Transformer layer (one residual around the sum). As a
ViT token mixer the layer sits in the attention slot of a block that has its own MLP after it; ``ffn_ratio=0``
drops the point-wise branch (the block's MLP then plays its role, though in series rather than in parallel).

Kernel sizes: default (3, 15), those of every MUSE training command the authors release (``--attn_wide_kernels
[3,15]``); other reimplementations use (1, 3, 5), and any tuple of widths >= 1 works. Differences from the released
code, which follows the paper's equations in structure: its local branch is fairseq's *dynamic* convolution (Wu et
al., 2019: kernels predicted from each token, softmax-normalised over the width, weights shared by groups of
channels) and its output enters a joint output projection concatenated with the attention's; here, as the paper
describes it, the convolutions are static depth-wise separable ones whose point-wise part is the branch's output
projection. The convolutions run along the token order (class token first, then the patches row by row).

Masks: key padding is honoured by every branch: the attention hides the padded keys, and the padded tokens' values
are zeroed before the convolutions so that they cannot reach a neighbour (the code does the same with
``--dynamic_padding``); the feed-forward branch is token-wise. Causal: the convolutions are padded on the left only
(k - 1 zeros, as the code's decoder does), so token i sees tokens i - k + 1 .. i. A dense (per-pair) mask cannot
be honoured by the convolutions and is refused.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_float, check_int, get_act
from ..registry import register
from ._base import TokenMixer, softmax_attention

__all__ = ['MUSEAttention', 'SeparableConv1d']


class SeparableConv1d(nn.Module):
    """Depth-wise convolution of width ``kernel_size`` along the tokens, then a point-wise ``Linear(dim, dim)``.

    Children ``depthwise`` (``nn.Conv1d`` with ``groups=dim``) and ``pointwise``.
    """

    def __init__(self, dim: int, kernel_size: int, device=None, dtype=None) -> None:
        super().__init__()
        self.kernel_size = check_int('kernel_sizes', kernel_size)
        self.depthwise = nn.Conv1d(dim, dim, kernel_size, groups=dim, device=device, dtype=dtype)
        self.pointwise = nn.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, v: Tensor, causal: bool = False) -> Tensor:
        """``v`` [B, C, N] -> [B, N, C]; ``causal`` pads on the left only (else centred, the extra zero on the
        right for an even width)."""
        k = self.kernel_size
        pad = (k - 1, 0) if causal else ((k - 1) // 2, k // 2)
        return self.pointwise(self.depthwise(F.pad(v, pad)).transpose(1, 2))


@register(
    'muse', paper='MUSE: Parallel Multi-Scale Attention for Sequence to Sequence Learning', arxiv='1911.09483',
    year=2019, family='softmax', complexity='O(N²·C + N·k·C)', kind='mixer', supports_causal=True,
)
class MUSEAttention(TokenMixer):
    """Parallel multi-scale attention: softmax attention + shared-value separable convolutions + feed-forward.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`; ``scale_norm`` normalises the attention branch before ``proj``,
            ``proj_drop`` acts on the sum of the branches).
        kernel_sizes: widths of the depth-wise convolutions (default (3, 15), the released code's); empty: no
            convolution branch (MUSE-simple).
        ffn_ratio: hidden width of the point-wise branch over ``dim`` (the paper's layers: 4; 0: no branch).
        act_layer: activation of the point-wise branch (default ReLU, the code's).
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask``: [B, N] bool key padding (True = real token).
    """

    supports_key_padding = True
    supports_causal = True

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            scale_norm: bool = False,
            proj_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            norm_layer: type[nn.Module] | None = None,
            *,
            kernel_sizes: tuple[int, ...] = (3, 15),
            ffn_ratio: float = 4.,
            act_layer: type[nn.Module] | str = nn.ReLU,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        dd = dict(device=device, dtype=dtype)
        if not isinstance(kernel_sizes, (tuple, list)):
            raise TypeError(f'kernel_sizes must be a tuple of ints >= 1, got {type(kernel_sizes).__name__}')
        self.kernel_sizes = tuple(check_int('kernel_sizes', k) for k in kernel_sizes)
        self.convs = nn.ModuleList([SeparableConv1d(dim, k, **dd) for k in self.kernel_sizes])
        self.kernel_logits = nn.Parameter(torch.zeros(len(self.kernel_sizes), **dd))
        self.ffn_ratio = check_float('ffn_ratio', ffn_ratio, 0.)
        hidden = int(dim * self.ffn_ratio)
        self.fc1 = nn.Linear(dim, hidden, **dd) if hidden > 0 else None
        self.act = get_act(act_layer)
        self.fc2 = nn.Linear(hidden, dim, **dd) if hidden > 0 else None

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        kpm, _ = self.check_input(x, attn_mask, is_causal)
        B, N, C = x.shape
        q, k, v = self.split_heads(x)
        p = self.attn_drop.p if self.training else 0.
        att = softmax_attention(q, k, v, kpm, None, is_causal, dropout_p=p, scale=self.scale)
        out = self.proj(self.norm(att.transpose(1, 2).reshape(B, N, C)))
        if len(self.kernel_sizes) > 0:
            shared = v.transpose(1, 2).reshape(B, N, C)  # the attention's values, all heads
            if kpm is not None:
                shared = shared.masked_fill(~kpm[..., None], 0.)
            shared = shared.transpose(1, 2)  # [B, C, N]
            alpha = torch.softmax(self.kernel_logits, dim=0)
            for i, conv in enumerate(self.convs):
                out = out + alpha[i] * conv(shared, is_causal)
        if self.fc1 is not None and self.fc2 is not None:
            out = out + self.fc2(self.act(self.fc1(x)))
        return self.proj_drop(out)
