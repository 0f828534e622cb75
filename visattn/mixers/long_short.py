"""Long-Short Transformer: a short-term sliding window and a long-range dynamic projection under one softmax.

Paper: "Long-Short Transformer: Efficient Transformers for Language and Vision", Zhu, Ping, Xiao, Shoeybi,
Goldstein, Anandkumar, Catanzaro, NeurIPS 2021, arXiv:2107.02192 (https://arxiv.org/abs/2107.02192); released
code: https://github.com/NVIDIA/transformer-ls.

Per head, with queries q = x W_q / √D, keys k = x W_k and values v = x W_v (``qkv``, as timm):

- long range (dynamic projection): ``P = softmax(x W_P)`` [N, r], normalised over the N positions (each of the r
  landmarks is a convex combination of the real tokens), ``K̄ = LN_L(Pᵀ k)``, ``V̄ = LN_L(Pᵀ v)``;
- short term (segment-wise sliding window): the sequence is cut into segments of ``w = window`` tokens; the
  queries of a segment see the keys of their segment and ``max(w // 2, 1)`` keys on each side, ``LN_S(k)``,
  ``LN_S(v)``;
- ``out_i = softmax(q_i [K̄; K̃_i]ᵀ) [V̄; Ṽ_i]``: one softmax over the union of the r landmarks and the window
  (computed as two pieces with their log-sum-exp, merged exactly).

DualLN: the two branches' keys and values get separate LayerNorms, ``LN_L`` (``dual_ln_l``) on the projected
landmarks and ``LN_S`` (``dual_ln_s``) on the window's (named as the paper's; the released bidirectional code names
them the other way round). As in the released code: they normalise over all C = H·D channels of a token (the heads
concatenated); the dynamic projection ``W_P`` (``dconv_fc``, with bias) reads the layer's input x (the paper's "K"
of ``softmax(K W_P)`` is the input sequence, before ``W_K``); and the raw keys are compressed, ``LN_L(Pᵀ k)`` (the
released causal code; its bidirectional LRA code compresses keys already normalised for the window, not offered).

Causal form (the paper's segment-wise dynamic projection, as the released autoregressive code): the sequence is
cut into segments of ``segment_size`` tokens, each compressed to its own r landmarks by ``P_s = softmax(x_s W_P)``
over the segment's tokens; a query sees the landmarks of the segments strictly before its own, and the ``window``
keys ending at itself. That part costs O(N²·r / segment_size); the bidirectional form is O(N·(w + r)).

Not included: the released code's optional depthwise convolution of V and its special CLS-token path (prefix tokens
are ordinary tokens here).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_int
from ..ops._dispatch import upcast
from ..registry import register
from ._base import TokenMixer, masked_softmax
from ._sparse_utils import _band, attention_lse, key_mask_of, merge_lse, pad_to_multiple, window_attention_lse

__all__ = ['LongShortAttention']


@register(
    'long_short', paper='Long-Short Transformer: Efficient Transformers for Language and Vision', arxiv='2107.02192',
    year=2021, family='low-rank', complexity='O(N·(w + r)·C)', kind='mixer', supports_causal=True,
)
class LongShortAttention(TokenMixer):
    """Long-Short attention: segment-wise sliding window plus r dynamically projected landmarks, with DualLN.

    Args:
        dim, num_heads, ...: as `TokenMixer`.
        window: w, the segment length of the short-term attention (default 8, the paper's Transformer-LS (w, r) =
            (8, 32) on LRA); causal: the number of keys ending at each query.
        num_landmarks: r, the landmarks of the dynamic projection (default 32); causal: per segment.
        segment_size: l, the segment length of the causal dynamic projection (default 16, the paper's enwik8
            setting; it uses r = 1 there).

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask`` [B, N] bool key padding (padded tokens get no weight in P and are
        masked in the window).
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
            window: int = 8,
            num_landmarks: int = 32,
            segment_size: int = 16,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        dd = dict(device=device, dtype=dtype)
        self.window = check_int('window', window)
        self.num_landmarks = check_int('num_landmarks', num_landmarks)
        self.segment_size = check_int('segment_size', segment_size)
        self.dconv_fc = nn.Linear(dim, num_heads * self.num_landmarks, **dd)
        self.dual_ln_s = nn.LayerNorm(dim, **dd)
        self.dual_ln_l = nn.LayerNorm(dim, **dd)
        self.ln_eps = self.dual_ln_s.eps

    def _norm_heads(self, t: Tensor, long: bool) -> Tensor:
        """``LN_L`` (``long``) or ``LN_S`` over the C channels of each token of ``t`` [B, H, M, D] (heads
        concatenated), in ``t``'s dtype (the compute dtype, also for 16-bit weights).

        Written out rather than through ``F.layer_norm``: AOT autograd (``torch.compile``) mis-strides the backward
        of ``native_layer_norm`` between these reshapes and the batched matmuls."""
        norm = self.dual_ln_l if long else self.dual_ln_s
        B, H, M, D = t.shape
        flat = t.transpose(1, 2).reshape(B, M, H * D)
        mean = flat.mean(-1, keepdim=True)
        var = (flat - mean).square().mean(-1, keepdim=True)
        flat = (flat - mean) * torch.rsqrt(var + self.ln_eps) * norm.weight.to(t.dtype) + norm.bias.to(t.dtype)
        return flat.reshape(B, M, H, D).transpose(1, 2)

    def _window(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor, is_causal: bool,
                dropout_p: float) -> tuple[Tensor, Tensor]:
        """Short-term piece: ``(out [B, H, N, D], lse [B, H, N])``."""
        if is_causal:
            return window_attention_lse(q, k, v, window=self.window - 1, causal=True, key_mask=valid,
                                        scale=self.scale, dropout_p=dropout_p)
        N, w = q.shape[-2], self.window
        ext = max(w // 2, 1)
        qb = pad_to_multiple(q, w, -2).unflatten(-2, (-1, w))  # [B, H, nb, w, D]
        kb, vb = _band(k, w, ext, ext, True), _band(v, w, ext, ext, True)  # [B, H, nb, w + 2·ext, D]
        mask = _band(valid, w, ext, ext, False).unsqueeze(-2)  # [B, 1, nb, 1, w + 2·ext]
        out, lse = attention_lse(qb, kb, vb, mask, scale=self.scale, dropout_p=dropout_p)
        return out.flatten(-3, -2)[..., :N, :], lse.flatten(-2)[..., :N]

    def _landmarks(self, x: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                   is_causal: bool) -> tuple[Tensor, Tensor, Tensor]:
        """``(K̄, V̄ [B, H, M, D], valid [B, 1, M])``: M = r landmarks, or r per segment when causal."""
        B, H, N, D = k.shape
        r = self.num_landmarks
        logits = upcast(self.dconv_fc(x)).reshape(B, N, H, r).permute(0, 2, 3, 1)  # [B, H, r, N]
        if not is_causal:
            p = masked_softmax(logits, key_padding_mask)  # over the N positions
            valid = torch.ones(B, 1, r, dtype=torch.bool, device=x.device)
            if key_padding_mask is not None:
                valid = valid & key_padding_mask.any(-1)[:, None, None]
            return p @ k, p @ v, valid
        seg = self.segment_size
        real = torch.ones(B, N, dtype=torch.bool, device=x.device) if key_padding_mask is None \
            else key_padding_mask
        real = pad_to_multiple(real, seg, -1, 0.).unflatten(-1, (-1, seg))  # [B, S, l]
        logits = pad_to_multiple(logits, seg, -1).unflatten(-1, (-1, seg)).transpose(2, 3)  # [B, H, S, r, l]
        p = torch.softmax(logits.masked_fill(~real[:, None, :, None, :], -1e30), dim=-1)
        p = p * real[:, None, :, None, :].to(p.dtype)  # a segment of padding only: no landmark
        kl = p @ pad_to_multiple(k, seg, -2).unflatten(-2, (-1, seg))  # [B, H, S, r, D]
        vl = p @ pad_to_multiple(v, seg, -2).unflatten(-2, (-1, seg))
        valid = real.any(-1, keepdim=True).expand(-1, -1, r).flatten(1).unsqueeze(1)  # [B, 1, S·r]
        return kl.flatten(2, 3), vl.flatten(2, 3), valid

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        kpm, dense = self.check_input(x, attn_mask, is_causal)
        q, k, v = self.split_heads(x)
        dtype = v.dtype
        q, k, v = upcast(q), upcast(k), upcast(v)
        dropout_p = self.attn_drop.p if self.training else 0.
        valid = key_mask_of(kpm, q)  # [B, 1, N]
        short = self._window(q, self._norm_heads(k, False), self._norm_heads(v, False), valid, is_causal, dropout_p)
        kl, vl, lm_valid = self._landmarks(x, k, v, kpm, is_causal)
        kl, vl = self._norm_heads(kl, True), self._norm_heads(vl, True)
        lm_mask = lm_valid.unsqueeze(-2)  # [B, 1, 1, M]
        if is_causal:
            n, seg = q.shape[-2], self.segment_size
            q_seg = torch.arange(n, device=q.device) // seg
            lm_seg = torch.arange(kl.shape[-2], device=q.device) // self.num_landmarks
            lm_mask = lm_mask & (lm_seg[None, :] < q_seg[:, None])  # [B, 1, N, M]: earlier segments only
        long = attention_lse(q, kl, vl, lm_mask, scale=self.scale, dropout_p=dropout_p)
        return self.merge_heads(merge_lse([short, long]).to(dtype))
