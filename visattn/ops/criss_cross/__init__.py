"""``criss_cross_attention``: each position attends to its row and its column in one softmax.

Paper: "CCNet: Criss-Cross Attention for Semantic Segmentation", Huang, Wang, Huang, Huang, Wei, Liu,
ICCV 2019, arXiv:1811.11721.
"""

from __future__ import annotations

from torch import Tensor

from .._dispatch import check_qkv, check_scale, resolve_backend
from .naive import criss_cross_attention_naive

__all__ = ['criss_cross_attention', 'criss_cross_attention_naive']

_OP = 'criss_cross_attention'


def criss_cross_attention(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        scale: float | None = None,
        backend: str = 'auto',
) -> Tensor:
    """Criss-cross attention: position (y, x) attends to the keys of column x and of row y.

    One softmax over the Hs + Ws - 1 keys ``(z, x)`` for all z and ``(y, u)`` for u != x (the position itself
    counted once). CCNet applies it twice (recurrence R = 2) so that information reaches every position.

    Args:
        q, k: [B, H, Hs, Ws, Dk].
        v: [B, H, Hs, Ws, Dv].
        scale: factor on q·k; default 1/sqrt(Dk). CCNet uses no scaling: pass ``scale=1.0``.
        backend: ``'auto'`` (Triton on CUDA, else PyTorch; ``VISATTN_BACKEND`` overrides), ``'torch'`` or
            ``'triton'``.

    Returns:
        [B, H, Hs, Ws, Dv] in the inputs' dtype (softmax and accumulation in float32). Memory
        O(Hs·Ws·(Hs + Ws)) on the PyTorch path, O(Hs·Ws·D) in the kernel.

    Raises:
        ValueError, TypeError: wrong shapes, dtypes, devices or arguments (the message names the argument).
    """
    check_qkv(q, k, v, _OP, '[B, H, Hs, Ws, D]')
    scale = check_scale(scale, q.shape[-1], _OP)
    if resolve_backend(backend, q, k, v, op=_OP) == 'triton':
        from .triton import criss_cross_attention_triton

        return criss_cross_attention_triton(q, k, v, scale=scale)
    return criss_cross_attention_naive(q, k, v, scale)
