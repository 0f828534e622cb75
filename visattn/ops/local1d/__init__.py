"""``local_attention_1d``: sliding-window (optionally dilated, optionally causal) softmax attention.

Papers: "Image Transformer", Parmar et al., ICML 2018, arXiv:1802.05751 (local 1-D attention);
"Longformer: The Long-Document Transformer", Beltagy, Peters, Cohan, 2020, arXiv:2004.05150 (sliding and
dilated sliding windows).
"""

from __future__ import annotations

from torch import Tensor

from .._dispatch import check_positive_int, check_qkv, check_scale, resolve_backend
from .naive import local_attention_1d_naive, window_offsets

__all__ = ['local_attention_1d', 'local_attention_1d_naive', 'window_offsets']

_OP = 'local_attention_1d'


def local_attention_1d(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        window: int,
        dilation: int = 1,
        causal: bool = False,
        scale: float | None = None,
        backend: str = 'auto',
) -> Tensor:
    """Sliding-window softmax attention over a sequence.

    Window: query i attends to the keys ``j = i + dilation·t`` with ``t ∈ [-(window//2), window//2]``
    (``window`` keys centred on the query; ``window`` must be odd), or, when ``causal``,
    ``t ∈ [-(window-1), 0]`` (the ``window`` keys ending at the query). Keys outside ``[0, N)`` are left
    out, so queries near the ends see fewer keys (at least themselves). Softmax in float32; cost
    O(N·window·D), and no N×N matrix is formed on either backend.

    Args:
        q, k: [B, H, N, Dk].
        v: [B, H, N, Dv].
        window: keys per query (>= 1).
        dilation: step between the keys of a window (default 1).
        causal: keys at or before the query only.
        scale: factor on q·k (default 1/sqrt(Dk)).
        backend: ``'auto'`` (Triton on CUDA, else PyTorch; ``VISATTN_BACKEND`` overrides), ``'torch'`` or
            ``'triton'``.

    Returns:
        [B, H, N, Dv] in the inputs' dtype.

    Raises:
        ValueError, TypeError: wrong shapes, dtypes, devices or arguments (the message names the argument).
    """
    check_qkv(q, k, v, _OP, '[B, H, N, D]')
    check_positive_int(window, 'window', _OP)
    check_positive_int(dilation, 'dilation', _OP)
    if not causal and window % 2 == 0:
        raise ValueError(f'{_OP}: window must be odd when causal=False (centred on the query), got {window}')
    scale = check_scale(scale, q.shape[-1], _OP)
    if resolve_backend(backend, q, k, v, op=_OP) == 'triton':
        from .triton import local_attention_1d_triton

        return local_attention_1d_triton(q, k, v, window=window, dilation=dilation, causal=bool(causal), scale=scale)
    return local_attention_1d_naive(q, k, v, window, dilation, bool(causal), scale)
