"""Triton path of ``criss_cross_attention``: the shared window kernels (``visattn.ops._window_triton``) in
criss-cross mode (Hs column slots, then Ws - 1 row slots that skip the query's own column)."""

from __future__ import annotations

from torch import Tensor

from .._window_triton import MODE_CRISS_CROSS, window_attention


def criss_cross_attention_triton(q: Tensor, k: Tensor, v: Tensor, *, scale: float) -> Tensor:
    """Criss-cross attention on [B, H, Hs, Ws, D] (arguments checked by ``criss_cross_attention``)."""
    hs, ws = q.shape[2], q.shape[3]
    return window_attention(q, k, v, None, mode=MODE_CRISS_CROSS, window=1, dilation=1, causal=False,
                            nkeys=hs + ws - 1, ws=ws, scale=scale)
