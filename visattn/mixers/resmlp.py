"""ResMLP's cross-patch linear layer as a token mixer.

Paper: "ResMLP: Feedforward Networks for Image Classification with Data-Efficient Training", Touvron, Bojanowski,
Caron, Cord, El-Nouby, Grave, Izacard, Joulin, Synnaeve, Verbeek, Jégou, IEEE TPAMI 2022, arXiv:2105.03404
(https://arxiv.org/abs/2105.03404).

The paper's residual block is ``Z = X + Aff((A Aff(X)ᵀ)ᵀ)``, ``Y = Z + Aff(C GELU(B Aff(Z)))`` with
``Aff(x) = α ⊙ x + β`` per channel and A ∈ R^{N×N} mixing the patches, the same for every channel. The split
in a timm ViT block (``x + drop_path(ls1(attn(norm1(x))))``), which is timm's ``ResBlock``:

- ``norm1`` (and ``norm2``, the final ``norm``) is the inner Aff: build the ViT with
  ``norm_layer=timm.models.mlp_mixer.Affine``;
- this mixer is the cross-patch linear ``A X + b`` (``weight`` [N, N], ``bias`` [N], timm's ``linear_tokens``);
- ``ls1`` is the outer Aff's α: the ViT's layer scale (``init_values``; timm's ``ResBlock.ls1``).

Paper and released code differ on the biases: the released code (and timm) give A a per-token bias b and the
outer Aff no β (layer scale only), the paper writes A without bias and the outer Aff with a per-channel β. The
code's form is the default, so that timm's and the authors' weights load; ``paper_bias=True`` gives the paper's
(``bias`` [N] replaced by ``beta`` [C], added after A and scaled with it by the ViT's layer scale, which spans the
same functions as the paper's ``α ⊙ A X + β``).

A timm ResMLP (``resmlp_12_224``, ...) state dict loads into ``VisionTransformer(class_token=False,
pos_embed='none', global_pool='avg', fc_norm=False, norm_layer=Affine, init_values=..., attn_layer=
vit_mixer_layer('resmlp', img_size, patch_size, num_prefix_tokens=0))`` after renaming ``stem.`` ->
``patch_embed.``, ``.linear_tokens.`` -> ``.attn.``, ``.mlp_channels.`` -> ``.mlp.``, ``.ls1`` / ``.ls2`` ->
``.ls1.gamma`` / ``.ls2.gamma`` (tests/mixers/test_resmlp.py checks the outputs agree).

A shorter input than ``seq_len`` uses the top-left N×N block of A (and the first N biases). Key padding is exact
(hidden tokens are zeroed: their columns of A contribute nothing); ``is_causal`` makes A lower-triangular, which is
exactly causal (the paper also adapts ResMLP to machine translation, whose decoder must be causal).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ..registry import register
from ._base import TokenMixer, check_length, check_seq_len
from .mlp_mixer import hide_padded, mix_tokens

__all__ = ['ResMLPCrossPatch']


@register(
    'resmlp', paper='ResMLP: Feedforward Networks for Image Classification with Data-Efficient Training',
    arxiv='2105.03404', year=2021, family='mlp', complexity='O(N²·C)', kind='mixer', supports_causal=True,
    requires_seq_len=True,
)
class ResMLPCrossPatch(TokenMixer):
    """ResMLP's cross-patch linear layer ``A X + b`` over the token axis, shared by the channels.

    Args:
        dim, num_heads, ...: timm ``Attention``'s constructor (``num_heads`` must divide ``dim``; no heads, no
            ``qkv`` and no ``proj`` are used; ``attn_drop`` is unused, ``proj_drop`` is the dropout after A).
        seq_len: N of A, the longest input (required).
        paper_bias: the paper's per-channel β after A instead of the released code's per-token bias (default
            False: the code's, whose weights load).
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C] with N <= seq_len; ``attn_mask``: [B, N] bool key padding (True = real token);
        ``is_causal``: token i mixes tokens j <= i.
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
            seq_len: int | None = None,
            paper_bias: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            use_qkv=False, use_proj=False, device=device, dtype=dtype)
        dd = dict(device=device, dtype=dtype)
        self.seq_len = check_seq_len(seq_len)
        self.weight = nn.Parameter(torch.empty(self.seq_len, self.seq_len, **dd))
        self.bias = None if paper_bias else nn.Parameter(torch.empty(self.seq_len, **dd))
        self.beta = nn.Parameter(torch.empty(dim, **dd)) if paper_bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The released code's initialisation: A ~ N(0, 0.02²) truncated at ±2, biases 0."""
        if self.weight.device.type == 'meta':
            return
        nn.init.trunc_normal_(self.weight, std=0.02)
        for p in (self.bias, self.beta):
            if p is not None:
                nn.init.zeros_(p)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        kpm, _ = self.check_input(x, attn_mask, is_causal)
        n = x.shape[1]
        check_length(self.mixer_name, n, self.seq_len)
        dtype = x.dtype
        x = hide_padded(x, kpm)
        weight = self.weight[:n, :n]
        if is_causal:
            weight = weight.tril()
        bias = self.bias
        out = mix_tokens(x, weight, None if bias is None else bias[:n])  # [B, N, C]
        beta = self.beta
        if beta is not None:
            out = out + beta.to(out.dtype)
        return self.proj_drop(out.to(dtype))
