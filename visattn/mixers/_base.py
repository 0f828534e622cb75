"""What every token mixer shares: timm ``Attention``'s constructor, projections, masks and head split.

A mixer subclasses `TokenMixer` and implements ``attend(q, k, v, key_padding_mask, attn_mask, is_causal)`` on
``[B, H, N, D]`` tensors; the base class does the ``qkv`` projection (same parameter names and shapes as
timm's ``Attention``, so a pretrained ViT's weights load), the optional q/k norms, the output norm, ``proj``
and the dropouts, and turns the user's ``attn_mask`` into a key-padding mask where it is one.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
from torch import Tensor


def normalize_mask(attn_mask: Tensor | None, batch: int, seq_len: int) -> tuple[Tensor | None, Tensor | None]:
    """Split a user mask into ``(key_padding_mask, dense_mask)``; at most one is not None.

    Accepted forms:
        - ``[B, N]`` bool: key padding, True = the token is real (attend to it), False = padding.
        - ``[B, 1, 1, N]`` bool: the same, in SDPA's broadcast layout.
        - any other bool or float mask that broadcasts to ``[B, H, N, N]`` (SDPA's convention: bool True =
          attend, float = added to the scores) is returned as ``dense_mask``.
    """
    if attn_mask is None:
        return None, None
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f'attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}')
    if attn_mask.dtype == torch.bool:
        if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (batch, seq_len):
            return attn_mask, None
        if attn_mask.dim() == 4 and attn_mask.shape[1] == 1 and attn_mask.shape[2] == 1 \
                and attn_mask.shape[3] == seq_len and attn_mask.shape[0] in (1, batch):
            return attn_mask[:, 0, 0].expand(batch, seq_len), None
    if attn_mask.dim() < 2 or attn_mask.shape[-1] != seq_len or attn_mask.shape[-2] not in (1, seq_len):
        raise ValueError(
            f'attn_mask must be a [B, N] bool key-padding mask or broadcast to [B, H, N, N] with N={seq_len}, '
            f'got shape {tuple(attn_mask.shape)}')
    return None, attn_mask


class TokenMixer(nn.Module):
    """Base class of the 1-D token mixers: ``[B, N, C] -> [B, N, C]``.

    Args:
        dim: channels C of the tokens.
        num_heads: number of heads H (C must be divisible by H).
        qkv_bias: bias in the ``qkv`` projection.
        qk_norm: normalise q and k per head with ``norm_layer``.
        scale_norm: normalise the attention output with ``norm_layer`` before ``proj``.
        proj_bias: bias in ``proj``.
        attn_drop: dropout on attention weights (for mixers that form weights) or on the mixed values.
        proj_drop: dropout after ``proj``.
        norm_layer: norm used by ``qk_norm`` / ``scale_norm``.
        device, dtype: factory arguments.

    Class attributes a subclass sets:
        supports_key_padding: ``attend`` honours a ``[B, N]`` key-padding mask.
        supports_dense_mask: ``attend`` honours an arbitrary ``[B, H, N, N]`` mask.
        supports_causal: ``attend`` honours ``is_causal=True``.
    """

    supports_key_padding: ClassVar[bool] = False
    supports_dense_mask: ClassVar[bool] = False
    supports_causal: ClassVar[bool] = False

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
            use_qkv: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f'dim must be a positive int, got {dim!r}')
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f'num_heads must be a positive int, got {num_heads!r}')
        if dim % num_heads:
            raise ValueError(f'dim={dim} must be divisible by num_heads={num_heads}')
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError('norm_layer must be given when qk_norm or scale_norm is True')
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd) if use_qkv else None
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(dim, **dd) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def split_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, N, C] -> q, k, v`` each ``[B, H, N, D]``, with the q/k norms applied."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def check_input(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool) -> tuple[Tensor | None, Tensor | None]:
        """Validate ``x`` and the masking request; return ``(key_padding_mask, dense_mask)``."""
        name = type(self).__name__
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f'{name}: x must be [B, N, {self.dim}], got {shape}')
        if is_causal and not self.supports_causal:
            raise ValueError(f'{name} cannot honour is_causal=True; see visattn.list_mixers(causal=True)')
        kpm, dense = normalize_mask(attn_mask, x.shape[0], x.shape[1])
        if kpm is not None and not (self.supports_key_padding or self.supports_dense_mask):
            raise ValueError(f'{name} cannot honour a padding mask (attn_mask)')
        if dense is not None and not self.supports_dense_mask:
            raise ValueError(
                f'{name} honours only a [B, N] bool key-padding attn_mask, got shape {tuple(attn_mask.shape)}')
        if kpm is not None and not self.supports_key_padding:
            dense, kpm = kpm[:, None, None, :], None
        return kpm, dense

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        """Mix ``v`` ``[B, H, N, D]`` by the mechanism; return ``[B, H, N, D]``."""
        raise NotImplementedError

    def merge_heads(self, out: Tensor) -> Tensor:
        """``[B, H, N, D] -> [B, N, C]``, then the output norm, ``proj`` and dropout."""
        B, _, N, _ = out.shape
        return self.proj_drop(self.proj(self.norm(out.transpose(1, 2).reshape(B, N, self.dim))))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        kpm, dense = self.check_input(x, attn_mask, is_causal)
        q, k, v = self.split_heads(x)
        return self.merge_heads(self.attend(q, k, v, kpm, dense, is_causal))
