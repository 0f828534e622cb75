"""gMLP's gated MLP with its spatial gating unit as a token mixer.

Paper: "Pay Attention to MLPs", Liu, Dai, So, Le, NeurIPS 2021, arXiv:2105.08050 (https://arxiv.org/abs/2105.08050).

The gMLP block is ``Y = X + (s(σ(norm(X) U))) V`` with the spatial gating unit (SGU)

    Z = σ(X U) = [Z1, Z2] (channel halves),    s(Z) = Z1 ⊙ f_{W,b}(norm(Z2)),    f_{W,b}(Z2) = W Z2 + b,

W ∈ R^{N×N} mixing the tokens (initialised near 0, b at 1, so that every block starts as an FFN), σ = GELU, U:
C -> F, V: F/2 -> C. gMLP's block has no second sub-layer: this mixer is the whole gated MLP ``(fc1, GELU, SGU,
fc2)``, i.e. timm's ``GatedMlp`` with its ``SpatialGatingUnit``, with the same parameter names (``fc1``,
``gate.norm``, ``gate.proj``, ``fc2``) and the same order of the halves (the first half gates, the second is
normalised and projected). Put in timm's ``SpatialGatingBlock`` as its ``mlp_channels`` (timm's ``MlpMixer``
takes it as ``mlp_layer``), it reproduces timm's gMLP and loads its state dict unchanged
(tests/mixers/test_gmlp.py). In a ViT block it takes the attention slot, and the ViT's FFN follows it.

Initialisation: W ~ N(0, (10⁻⁶)²) and b = 1, timm's reading of the paper's "near-zero values" (the paper gives
no scale). The norm of the SGU is a LayerNorm (eps 1e-5, as timm's).

Fixed length: W is built for ``seq_len`` tokens; a shorter input uses its top-left N×N block and the first N
entries of b. Key padding is exact: a hidden token's column of W is zeroed (its normalised half is set to 0 before
the spatial projection), and nothing else mixes tokens. ``is_causal`` makes W lower-triangular, which makes the
whole mixer exactly causal (token i's gate reads tokens j <= i only).
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from .._utils import check_float, check_int
from ..registry import register
from ._base import TokenMixer, check_length, check_seq_len
from .mlp_mixer import hide_padded, mix_tokens

__all__ = ['GMLPSpatialGating', 'SpatialGatingUnit']


class SpatialGatingUnit(nn.Module):
    """gMLP's SGU: ``Z1 ⊙ (W norm(Z2) + b)`` over ``[Z1, Z2]`` = the channel halves of ``z`` [B, N, F].

    Args:
        channels: F (even); the output has F / 2.
        seq_len: N of W.
        norm_layer: the norm of Z2 (default LayerNorm).
        init_std: standard deviation of W at initialisation (b starts at 1).
        device, dtype: factory arguments.
    """

    def __init__(self, channels: int, seq_len: int, norm_layer: type[nn.Module] = nn.LayerNorm,
                 init_std: float = 1e-6, *, device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.init_std = init_std
        self.norm = norm_layer(channels // 2, **dd)
        self.proj = nn.Linear(seq_len, seq_len, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.proj.weight.device.type == 'meta':
            return
        nn.init.normal_(self.proj.weight, std=self.init_std)
        nn.init.ones_(self.proj.bias)

    def init_weights(self) -> None:
        """timm's name for `reset_parameters` (timm's ``MlpMixer`` calls it after its own initialisation)."""
        self.reset_parameters()

    def forward(self, z: Tensor, key_padding_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """``z`` [B, N, F] -> [B, N, F / 2]; the spatial projection in float32 or wider."""
        n = z.shape[1]
        u, v = z.chunk(2, dim=-1)
        v = hide_padded(self.norm(v), key_padding_mask)
        weight = self.proj.weight[:n, :n]
        if is_causal:
            weight = weight.tril()
        gate = mix_tokens(v, weight, self.proj.bias[:n])  # [B, N, F / 2]
        return (u * gate).to(z.dtype)


@register(
    'gmlp', paper='Pay Attention to MLPs', arxiv='2105.08050', year=2021, family='mlp',
    complexity='O(N²·F + N·C·F)', kind='mixer', supports_causal=True, requires_seq_len=True,
)
class GMLPSpatialGating(TokenMixer):
    """gMLP's gated MLP ``fc2(SGU(GELU(fc1(x))))``, whose SGU mixes the tokens.

    Args:
        dim, num_heads, ...: timm ``Attention``'s constructor (``num_heads`` must divide ``dim``; no heads, no
            ``qkv`` and no ``proj`` are used). ``attn_drop`` is the dropout after the GELU, ``proj_drop`` after
            ``fc2`` (timm's ``GatedMlp`` ``drop1`` and ``drop2``).
        seq_len: N of the spatial projection, the longest input (required).
        mlp_ratio: F / C (default 6, the paper's gMLP-Ti/S/B: d_ffn = 6 d_model).
        hidden_features: F itself, even (overrides ``mlp_ratio``).
        act_layer: σ (default GELU).
        gate_norm_layer: the norm inside the SGU (default LayerNorm with eps 1e-5, timm's).
        gate_init_std: standard deviation of W at initialisation (default 1e-6).
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
            mlp_ratio: float = 6.,
            hidden_features: int | None = None,
            act_layer: type[nn.Module] = nn.GELU,
            gate_norm_layer: type[nn.Module] = nn.LayerNorm,
            gate_init_std: float = 1e-6,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            use_qkv=False, use_proj=False, device=device, dtype=dtype)
        dd = dict(device=device, dtype=dtype)
        self.seq_len = check_seq_len(seq_len)
        check_float('mlp_ratio', mlp_ratio, 0., None, low_open=True)
        check_float('gate_init_std', gate_init_std, 0., None, low_open=True)
        if hidden_features is None:
            hidden_features = int(dim * mlp_ratio)
            if hidden_features < 2 or hidden_features % 2:
                raise ValueError(f'int(dim * mlp_ratio) must be an even int >= 2 (the SGU halves it), got '
                                 f'{hidden_features} from dim={dim}, mlp_ratio={mlp_ratio!r}')
        if check_int('hidden_features', hidden_features, 2) % 2:
            raise ValueError(f'hidden_features must be even (the SGU halves it), got {hidden_features!r}')
        self.hidden_features = hidden_features
        self.fc1 = nn.Linear(dim, hidden_features, **dd)
        self.act = act_layer()
        self.gate = SpatialGatingUnit(hidden_features, self.seq_len, gate_norm_layer, gate_init_std, **dd)
        self.fc2 = nn.Linear(hidden_features // 2, dim, **dd)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        kpm, _ = self.check_input(x, attn_mask, is_causal)
        check_length(self.mixer_name, x.shape[1], self.seq_len)
        z = self.attn_drop(self.act(self.fc1(x)))
        return self.proj_drop(self.fc2(self.gate(z, kpm, is_causal)))
