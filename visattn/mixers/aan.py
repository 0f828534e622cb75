"""Average attention network (AAN): a cumulative average of the tokens, a feed-forward layer and a gate.

Paper: "Accelerating Neural Transformer via an Average Attention Network", Zhang, Xiong, Su, ACL 2018,
arXiv:1805.00631 (https://arxiv.org/abs/1805.00631); the authors' code: bzhangGo/zero
(``models/transformer_aan.py``); OpenNMT-py's ``AverageAttention`` is another implementation.

For inputs y_1 .. y_N [C] the paper's layer computes (the residual and LayerNorm being the block's):

    g_j = FFN((1/j) Σ_{k<=j} y_k)                       average layer, FFN(a) = W₂ relu(W₁ a + b₁) + b₂
    i_j, f_j = σ(W [y_j; g_j] + b)                       gating layer, W [2C, 2C] (input and forget gates)
    h̃_j = i_j ⊙ y_j + f_j ⊙ g_j                          (then the block: LayerNorm(y_j + h̃_j))

O(N·C²) for the position-wise layers, O(N·C) for the mixing itself: no queries, keys or attention weights.
In the mixer slot of a ViT block (``x + mixer(norm(x))``) the mixer returns ``proj(h̃)``: ``proj`` (timm's name and
shape) is ours, kept so that the mixer has timm's output projection; ``out_proj=False`` drops it and gives the
paper's h̃ exactly. ``use_ffn=False`` skips the FFN (``g_j`` is the average): the authors' ``use_ffn`` and
OpenNMT's ``aan_useffn`` option (off by default in OpenNMT). The FFN's hidden width ``ffn_hidden`` defaults to C
(OpenNMT's choice); the authors' code uses the model's ``filter_size`` (4C in their base model): pass
``ffn_hidden=4 * dim``.

The paper defines the causal (decoder) form only; ``is_causal=True`` gives it. The non-causal form, ours, is
the mean over all visible tokens: every position gets the same average, so g is shared and the gate, which sees
each y_j, makes the outputs differ. Key padding: the average runs over the visible tokens only (the count too:
the authors' code divides the prefix sum by the prefix count of real tokens). A row with no visible
token at or before it averages to 0, never NaN; the FFN and the gate then act on that 0 as on any average (the
gate still passes the row's own input, so such a row is not zero). ``attn_drop`` drops the averages, the mixed
values. The mixer has no heads: ``num_heads`` is only checked against ``dim``; ``qk_norm`` has nothing to act on.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_int, get_act
from ..registry import register
from ._base import TokenMixer

__all__ = ['AverageAttention', 'masked_average']


def masked_average(x: Tensor, key_padding_mask: Tensor | None, causal: bool) -> Tensor:
    """The mean of the visible tokens of ``x`` [B, N, C] (all of them, or those at or before each position when
    ``causal``) in at least float32; hidden tokens enter as exact zeros; no visible token gives 0.

    Returns:
        [B, N, C] when ``causal``, else [B, 1, C].
    """
    ct = torch.promote_types(x.dtype, torch.float32)
    x = x.to(ct)
    if key_padding_mask is None:
        if causal:
            count = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=ct)[None, :, None]
            return x.cumsum(1) / count
        return x.mean(1, keepdim=True)
    keep = key_padding_mask[:, :, None]
    x = x.masked_fill(~keep, 0.)
    w = keep.to(ct)
    if causal:
        return x.cumsum(1) / w.cumsum(1).clamp_min(1.)
    return x.sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1.)


@register(
    'aan', paper='Accelerating Neural Transformer via an Average Attention Network', arxiv='1805.00631',
    year=2018, family='attention-free', complexity='O(N·C²)', kind='mixer', supports_causal=True,
)
class AverageAttention(TokenMixer):
    """Average attention: (cumulative) average of the tokens, FFN, input/forget gating, output projection.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`; no ``qkv``: the mixer forms no queries or keys).
        use_ffn: the FFN of the average layer (default True, the paper's).
        ffn_hidden: its hidden width (default ``dim``).
        act_layer: its activation (default ReLU, the paper's).
        out_proj: keep the output projection ``proj`` (default True; False: the paper's h̃).
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask``: [B, N] bool key padding (True = real token).

    Parameters: ``fc1`` [ffn_hidden, C], ``fc2`` [C, ffn_hidden] (with ``use_ffn``), ``gate`` [2C, 2C] (the
    authors' ``z_project``), ``proj`` [C, C] (with ``out_proj``).
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
            use_ffn: bool = True,
            ffn_hidden: int | None = None,
            act_layer: type[nn.Module] | str = nn.ReLU,
            out_proj: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            use_qkv=False, use_proj=out_proj, device=device, dtype=dtype)
        dd = dict(device=device, dtype=dtype)
        hidden = dim if ffn_hidden is None else check_int('ffn_hidden', ffn_hidden)
        self.q_norm = nn.Identity()  # no queries or keys to normalise
        self.k_norm = nn.Identity()
        self.use_ffn = bool(use_ffn)
        self.fc1 = nn.Linear(dim, hidden, **dd) if use_ffn else nn.Identity()
        self.act = get_act(act_layer) if use_ffn else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim, **dd) if use_ffn else nn.Identity()
        self.gate = nn.Linear(2 * dim, 2 * dim, **dd)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        kpm, _ = self.check_input(x, attn_mask, is_causal)
        avg = self.attn_drop(masked_average(x, kpm, is_causal).to(x.dtype))
        g = self.fc2(self.act(self.fc1(avg))).expand_as(x)  # [B, N, C]: non-causal, one g for every position
        i, f = self.gate(torch.cat([x, g], dim=-1)).chunk(2, dim=-1)
        return self.proj_drop(self.proj(self.norm(torch.sigmoid(i) * x + torch.sigmoid(f) * g)))
