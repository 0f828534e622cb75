"""MLP-Mixer's token-mixing MLP as a token mixer.

Paper: "MLP-Mixer: An all-MLP Architecture for Vision", Tolstikhin, Houlsby, Kolesnikov, Beyer, Zhai, Unterthiner,
Yung, Steiner, Keysers, Uszkoreit, Lucic, Dosovitskiy, NeurIPS 2021, arXiv:2105.01601
(https://arxiv.org/abs/2105.01601).

The token-mixing half of the paper's Eq. (1): every channel c of the (normalised) tokens X ∈ R^{N×C} goes through
one MLP over the token axis, shared by the channels,

    U_{*,c} = W2 σ(W1 X_{*,c} + b1) + b2,    W1 ∈ R^{D_S×N}, W2 ∈ R^{N×D_S}, σ = GELU,

with D_S = ``tokens_mlp_ratio · C`` (the paper's Mixer-B: D_S = 384 = C / 2). In a timm ViT block this mixer
stands in the attention slot, so ``x + drop_path(mixer(norm1(x)))`` is the first half of timm's ``MixerBlock``
(``x + drop_path(mlp_tokens(norm1(x)ᵀ)ᵀ)``) and the ViT's ``mlp`` is its ``mlp_channels``. The parameters are those
of timm's ``Mlp`` (``fc1`` [D_S, N], ``fc2`` [N, D_S], with biases): a timm ``MlpMixer`` state dict loads into
``VisionTransformer(class_token=False, pos_embed='none', global_pool='avg', fc_norm=False,
attn_layer=vit_mixer_layer('mlp_mixer', img_size, patch_size, num_prefix_tokens=0))`` after renaming
``stem.`` -> ``patch_embed.``, ``.mlp_tokens.`` -> ``.attn.`` and ``.mlp_channels.`` -> ``.mlp.``
(tests/mixers/test_mlp_mixer.py checks the outputs agree).

The MLP is built for ``seq_len`` tokens; a shorter input uses the first N columns of W1 and the first N rows of W2
and b2 (the same as zero-padding it to ``seq_len`` and dropping the padded outputs). A key-padding mask is exact:
hidden tokens are zeroed, which zeroes their columns of W1 (their outputs are what the MLP gives them, and no
visible output depends on them). ``is_causal`` is refused: every hidden unit of W1 sees every token.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_float, check_int
from ..ops._dispatch import upcast
from ..registry import register
from ._base import TokenMixer, check_length, check_seq_len

__all__ = ['MLPMixerTokenMLP', 'mix_tokens', 'hide_padded']


def mix_tokens(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x`` [B, N, C] mixed along its tokens by ``weight`` [M, N] (and ``bias`` [M]): ``y[b, m, c] = Σ_n
    weight[m, n] x[b, n, c] + bias[m]``, [B, M, C], in the dtype of ``x`` (weights cast to it)."""
    b = None if bias is None else bias.to(x.dtype)
    return F.linear(x.transpose(1, 2), weight.to(x.dtype), b).transpose(1, 2)


def hide_padded(x: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    """``x`` [B, N, C] in float32 or wider, with the tokens that ``key_padding_mask`` [B, N] (True = real) hides set
    to exactly 0 (whatever their value: inf and NaN included)."""
    x = upcast(x)
    if key_padding_mask is None:
        return x
    return x.masked_fill(~key_padding_mask[:, :, None], 0.)


@register(
    'mlp_mixer', paper='MLP-Mixer: An all-MLP Architecture for Vision', arxiv='2105.01601', year=2021,
    family='mlp', complexity='O(N·D_S·C)', kind='mixer', requires_seq_len=True,
)
class MLPMixerTokenMLP(TokenMixer):
    """MLP-Mixer's token-mixing MLP ``W2 σ(W1 X + b1) + b2`` over the token axis, shared by the channels.

    Args:
        dim, num_heads, ...: timm ``Attention``'s constructor (``num_heads`` must divide ``dim``; no heads, no
            ``qkv`` and no ``proj`` are used). ``attn_drop`` is the dropout after σ, ``proj_drop`` after W2 (timm's
            ``Mlp`` ``drop1`` and ``drop2``).
        seq_len: N of the MLP, the longest input (required).
        tokens_mlp_ratio: D_S / C (default 0.5, timm's and the paper's Mixer-S/B/L).
        tokens_dim: D_S itself (overrides ``tokens_mlp_ratio``).
        act_layer: σ (default GELU).
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C] with N <= seq_len; ``attn_mask``: [B, N] bool key padding (True = real token).
    """

    supports_key_padding = True

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
            tokens_mlp_ratio: float = 0.5,
            tokens_dim: int | None = None,
            act_layer: type[nn.Module] = nn.GELU,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            use_qkv=False, use_proj=False, device=device, dtype=dtype)
        dd = dict(device=device, dtype=dtype)
        self.seq_len = check_seq_len(seq_len)
        check_float('tokens_mlp_ratio', tokens_mlp_ratio, 0., None, low_open=True)
        if tokens_dim is None:
            tokens_dim = int(tokens_mlp_ratio * dim)
            if tokens_dim < 1:
                raise ValueError(f'tokens_mlp_ratio * dim must be >= 1, got tokens_mlp_ratio={tokens_mlp_ratio!r} '
                                 f'with dim={dim}')
        self.tokens_dim = check_int('tokens_dim', tokens_dim)
        self.fc1 = nn.Linear(self.seq_len, self.tokens_dim, **dd)
        self.act = act_layer()
        self.fc2 = nn.Linear(self.tokens_dim, self.seq_len, **dd)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        kpm, _ = self.check_input(x, attn_mask, is_causal)
        n = x.shape[1]
        check_length(self.mixer_name, n, self.seq_len)
        dtype = x.dtype
        x = hide_padded(x, kpm)
        hidden = self.attn_drop(self.act(mix_tokens(x, self.fc1.weight[:, :n], self.fc1.bias)))  # [B, D_S, C]
        out = mix_tokens(hidden, self.fc2.weight[:n], self.fc2.bias[:n])  # [B, N, C]
        return self.proj_drop(out.to(dtype))
