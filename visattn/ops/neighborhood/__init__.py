"""``neighborhood_attention_2d``: k×k neighbourhood attention on a feature map, with NATTEN's borders.

Papers: "Neighborhood Attention Transformer", Hassani, Walton, Li, Li, Shi, CVPR 2023, arXiv:2204.07143;
"Dilated Neighborhood Attention Transformer", Hassani, Shi, 2022, arXiv:2209.15001 (dilation); the
sliding-window self-attention it generalises: "Stand-Alone Self-Attention in Vision Models", Ramachandran
et al., NeurIPS 2019, arXiv:1906.05909.
"""

from __future__ import annotations

from torch import Tensor

from .._dispatch import check_positive_int, check_qkv, check_scale, check_tensor, resolve_backend
from .naive import neighborhood_attention_2d_naive, window_index
from .torch_blocked import neighborhood_attention_2d_blocked

__all__ = ['neighborhood_attention_2d', 'neighborhood_attention_2d_blocked', 'neighborhood_attention_2d_naive',
           'window_index']

_OP = 'neighborhood_attention_2d'


def neighborhood_attention_2d(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        kernel_size: int,
        dilation: int = 1,
        rpb: Tensor | None = None,
        scale: float | None = None,
        backend: str = 'auto',
) -> Tensor:
    """Neighbourhood attention: each position attends to a k×k window of keys around it.

    Window along each axis (NATTEN's definition): the ``k`` positions ``i + dilation·t``,
    ``t ∈ [-(k//2), k//2]``, shifted as a whole to stay inside the map where the query is within
    ``k//2`` steps of a border, so every query sees exactly k×k keys (at a border the query is no longer at
    the window's centre). With dilation ``d`` the window stays in the query's residue class ``i mod d``, so
    the map must hold ``k`` positions of every class: ``Hs // d >= k`` and ``Ws // d >= k``.

    Args:
        q, k: [B, H, Hs, Ws, Dk].
        v: [B, H, Hs, Ws, Dv].
        kernel_size: odd window size k (>= 1).
        dilation: step between window positions (default 1).
        rpb: optional relative position bias [H, 2k-1, 2k-1], added to the logit of key (ky, kx) for query
            (y, x) at ``rpb[h, (ky - y)/d + k - 1, (kx - x)/d + k - 1]`` (NAT's bias).
        scale: factor on q·k (default 1/sqrt(Dk)).
        backend: ``'auto'`` (Triton on CUDA, else PyTorch; ``VISATTN_BACKEND`` overrides), ``'torch'`` or
            ``'triton'``. The PyTorch path is `neighborhood_attention_2d_blocked` (query tiles against their key
            bands as batched matmuls, the same function as the spec `neighborhood_attention_2d_naive`).

    Returns:
        [B, H, Hs, Ws, Dv] in the inputs' dtype (softmax and accumulation in float32).

    Raises:
        ValueError, TypeError: wrong shapes, dtypes, devices or arguments (the message names the argument).
    """
    check_qkv(q, k, v, _OP, '[B, H, Hs, Ws, D]')
    check_positive_int(kernel_size, 'kernel_size', _OP)
    check_positive_int(dilation, 'dilation', _OP)
    if kernel_size % 2 == 0:
        raise ValueError(f'{_OP}: kernel_size must be odd, got {kernel_size}')
    hs, ws = q.shape[2], q.shape[3]
    if hs // dilation < kernel_size or ws // dilation < kernel_size:
        raise ValueError(f'{_OP}: the map ({hs}×{ws}) is too small for kernel_size={kernel_size} with '
                         f'dilation={dilation}: need Hs // dilation >= kernel_size and Ws // dilation >= kernel_size')
    if rpb is not None:
        check_tensor(rpb, 'rpb', _OP, 3, '[H, 2k-1, 2k-1]')
        size = 2 * kernel_size - 1
        if tuple(rpb.shape) != (q.shape[1], size, size):
            raise ValueError(f'{_OP}: rpb must be [H, 2k-1, 2k-1] = {(q.shape[1], size, size)}, '
                             f'got {tuple(rpb.shape)}')
        if rpb.device != q.device:
            raise ValueError(f'{_OP}: rpb is on {rpb.device}, expected {q.device} like q')
    scale = check_scale(scale, q.shape[-1], _OP)
    if resolve_backend(backend, q, k, v, rpb, op=_OP) == 'triton':
        from .triton import neighborhood_attention_2d_triton

        return neighborhood_attention_2d_triton(q, k, v, kernel_size=kernel_size, dilation=dilation, rpb=rpb,
                                                scale=scale)
    return neighborhood_attention_2d_blocked(q, k, v, kernel_size, dilation, rpb, scale)
