"""Low-rank approximations of softmax attention: Linformer and Nyströmformer.

- ``linformer``: "Linformer: Self-Attention with Linear Complexity", Wang, Li, Khabsa, Fang, Ma, 2020,
  arXiv:2006.04768. Keys and values are projected along the sequence to length k by E, F [k, n]:
  ``softmax(Q (E K)ᵀ / √D) (F V)``. Sharing options of the paper: ``'headwise'`` (one E and one F shared by the
  heads of the layer, the default), ``'kv'`` (E = F, shared by the heads) and ``'none'`` (E_i, F_i per head).
  E and F are initialised N(0, 1/k) as in the paper. Layer-wise sharing is not offered.
- ``nystrom``: "Nyströmformer: A Nyström-Based Algorithm for Approximating Self-Attention", Xiong, Zeng,
  Chakraborty, Tan, Fung, Li, Singh, AAAI 2021, arXiv:2102.03902. With m landmarks Q̃, K̃ (means of
  consecutive segments of the queries and keys): ``softmax(Q K̃ᵀ/√D) · pinv(softmax(Q̃ K̃ᵀ/√D)) ·
  softmax(Q̃ Kᵀ/√D) V``, the pseudo-inverse by the paper's iteration
  ``Z ← ¼ Z (13I − AZ(15I − AZ(7I − AZ)))`` from ``Z0 = Aᵀ / (‖A‖₁ ‖A‖∞)``, plus a depthwise convolution of
  V along the sequence (kernel 33) as a skip connection.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_int, float_tiny
from ..ops._dispatch import upcast
from ..registry import register
from ._base import TokenMixer, check_length, check_seq_len, masked_softmax, softmax_attention

__all__ = ['Linformer', 'Nystromformer', 'iterative_pinv']


@register(
    'linformer', paper='Linformer: Self-Attention with Linear Complexity', arxiv='2006.04768', year=2020,
    family='low-rank', complexity='O(N·k·C)', kind='mixer', requires_seq_len=True,
)
class Linformer(TokenMixer):
    """Linformer attention: keys and values projected along the sequence from n = ``seq_len`` to k.

    Args:
        dim, num_heads, ...: as `TokenMixer`.
        seq_len: n, the longest input (required); a shorter input uses the first N columns of E and F (the
            same as zero-padding it to n).
        k: projected length, in [1, seq_len] (default ``min(256, seq_len)``: the paper's usual k = 256).
        sharing: ``'headwise'`` (default), ``'kv'`` or ``'none'``; see the module docstring.

    Shapes:
        x: [B, N, C] -> [B, N, C] with N <= seq_len; ``attn_mask`` [B, N] bool key padding (padded keys and
        values are zeroed before the projection).
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
            k: int | None = None,
            sharing: str = 'headwise',
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        self.seq_len = check_seq_len(seq_len)
        self.k = min(256, self.seq_len) if k is None else check_int('k', k, 1, self.seq_len)  # k <= n: a reduction
        if sharing not in ('headwise', 'kv', 'none'):
            raise ValueError(f"sharing must be 'headwise', 'kv' or 'none', got {sharing!r}")
        self.sharing = sharing
        shape = (num_heads if sharing == 'none' else 1, self.k, seq_len)
        self.proj_e = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.proj_f = None if sharing == 'kv' else nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in (self.proj_e, self.proj_f):
            if p is not None and p.device.type != 'meta':
                nn.init.normal_(p, std=self.k ** -0.5)

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        n = q.shape[-2]
        check_length(self.mixer_name, n, self.seq_len)
        if key_padding_mask is not None:
            keep = key_padding_mask[:, None, :, None].to(k.dtype)
            k, v = k * keep, v * keep
        e = self.proj_e[..., :n]
        f = e if self.proj_f is None else self.proj_f[..., :n]
        k, v = e @ k, f @ v  # [B, H, k, D]
        p = self.attn_drop.p if self.training else 0.
        return softmax_attention(q, k, v, dropout_p=p, scale=self.scale)


def iterative_pinv(a: Tensor, iterations: int = 6) -> Tensor:
    """Moore-Penrose pseudo-inverse of ``a`` [..., m, m] by the Nyströmformer iteration (float32 or wider).

    ``Z0 = aᵀ / (max column sum · max row sum)`` (per matrix), then ``Z ← ¼ Z (13I − aZ(15I − aZ(7I − aZ)))``.
    """
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
    col = a.abs().sum(-2).amax(-1, keepdim=True)[..., None]
    row = a.abs().sum(-1).amax(-1, keepdim=True)[..., None]
    z = a.transpose(-2, -1) / (col * row).clamp_min(float_tiny(a.dtype))
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def _segment_means(x: Tensor, valid: Tensor, segments: int) -> tuple[Tensor, Tensor]:
    """Means of ``segments`` consecutive equal-length segments of x [B, H, N, D] over its valid tokens.

    Returns the means [B, H, m, D] and which segments hold a valid token [B, 1, m] (bool).
    """
    B, H, N, D = x.shape
    size = math.ceil(N / segments)
    pad = segments * size - N
    x = nn.functional.pad(x * valid[:, None, :, None], (0, 0, 0, pad)).reshape(B, H, segments, size, D)
    count = nn.functional.pad(valid.to(x.dtype), (0, pad)).reshape(B, 1, segments, size).sum(-1)  # [B, 1, m]
    return x.sum(-2) / count.clamp_min(1)[..., None], count > 0


@register(
    'nystrom', paper='Nyströmformer: A Nyström-Based Algorithm for Approximating Self-Attention',
    arxiv='2102.03902', year=2021, family='low-rank', complexity='O(N·m·C)', kind='mixer',
)
class Nystromformer(TokenMixer):
    """Nyström approximation of softmax attention with m landmarks.

    An input of N tokens is cut into ``ceil(N / ceil(N / m))`` consecutive segments of equal length (the last
    may be shorter), so N < m uses one landmark per token. Padded tokens (``attn_mask`` False) are left out of
    the landmark means, of the keys, and of the convolution.

    Args:
        dim, num_heads, ...: as `TokenMixer`.
        num_landmarks: m (default 64, the paper's).
        pinv_iterations: iterations of the pseudo-inverse (default 6, the paper's).
        conv_kernel_size: kernel of the depthwise convolution of V along the sequence (default 33; None: no
            convolution).

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask`` [B, N] bool key padding.
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
            num_landmarks: int = 64,
            pinv_iterations: int = 6,
            conv_kernel_size: int | None = 33,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        self.num_landmarks = check_seq_len(num_landmarks, 'num_landmarks')
        self.pinv_iterations = check_int('pinv_iterations', pinv_iterations)
        self.conv = None
        if conv_kernel_size is not None:
            if check_int('conv_kernel_size', conv_kernel_size) % 2 == 0:
                raise ValueError(f'conv_kernel_size must be a positive odd int or None, got {conv_kernel_size!r}')
            self.conv = nn.Conv2d(
                num_heads, num_heads, (conv_kernel_size, 1), padding=(conv_kernel_size // 2, 0), groups=num_heads,
                bias=False, device=device, dtype=dtype)

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        B, H, N, D = q.shape
        dtype = v.dtype
        valid = torch.ones(B, N, dtype=torch.bool, device=q.device) if key_padding_mask is None else key_padding_mask
        q, k, vf = upcast(q) * self.scale, upcast(k), upcast(v)
        m = math.ceil(N / math.ceil(N / min(self.num_landmarks, N)))
        q_l, q_ok = _segment_means(q, valid, m)  # [B, H, m, D], [B, 1, m]
        k_l, k_ok = _segment_means(k, valid, m)
        kernel_1 = masked_softmax(q @ k_l.transpose(-2, -1), k_ok[:, 0])  # [B, H, N, m]
        kernel_2 = masked_softmax(q_l @ k_l.transpose(-2, -1), k_ok[:, 0]) * q_ok[..., None]  # [B, H, m, m]
        kernel_3 = masked_softmax(q_l @ k.transpose(-2, -1), valid) * q_ok[..., None]  # [B, H, m, N]
        out = kernel_1 @ (iterative_pinv(kernel_2, self.pinv_iterations) @ (kernel_3 @ vf))
        out = self.attn_drop(out.to(dtype))
        if self.conv is not None:
            out = out + self.conv(v * valid[:, None, :, None].to(dtype))
        return out
