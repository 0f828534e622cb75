"""Triton path of ``neighborhood_attention_2d``: the shared window kernels (``visattn.ops._window_triton``) in
neighbourhood mode (NATTEN's borders computed in the kernel)."""

from __future__ import annotations

from torch import Tensor

from .._window_triton import MODE_NEIGHBORHOOD, window_attention


def neighborhood_attention_2d_triton(q: Tensor, k: Tensor, v: Tensor, *, kernel_size: int, dilation: int,
                                     rpb: Tensor | None, scale: float) -> Tensor:
    """k×k neighbourhood attention on [B, H, Hs, Ws, D] (arguments checked by ``neighborhood_attention_2d``)."""
    return window_attention(q, k, v, rpb, mode=MODE_NEIGHBORHOOD, window=kernel_size, dilation=dilation,
                            causal=False, nkeys=kernel_size * kernel_size, ws=q.shape[3], scale=scale)
