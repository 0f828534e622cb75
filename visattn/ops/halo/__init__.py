"""``halo_attention_2d``: HaloNet's blocked local attention with halos and factorised relative embeddings.

Paper: "Scaling Local Self-Attention for Parameter Efficient Visual Backbones", Vaswani, Ramachandran, Srinivas,
Parmar, Hechtman, Shlens, CVPR 2021, arXiv:2103.12731.
"""

from __future__ import annotations

from torch import Tensor

from .._dispatch import check_positive_int, check_same, check_scale, check_tensor, resolve_backend
from .naive import halo_attention_2d_naive, halo_rel_index

__all__ = ['PAD_MODES', 'halo_attention_2d', 'halo_attention_2d_naive', 'halo_rel_index']

_OP = 'halo_attention_2d'
PAD_MODES = ('zeros', 'mask')


def halo_attention_2d(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        block_size: int,
        halo_size: int,
        stride: int = 1,
        rel_h: Tensor | None = None,
        rel_w: Tensor | None = None,
        scale: float | None = None,
        pad_mode: str = 'zeros',
        rel_stride: int | None = None,
        backend: str = 'auto',
) -> Tensor:
    """Blocked local attention: each b×b block of the map attends to the block grown by a halo of h pixels.

    The H×W key map is cut into b×b blocks, zero-padded at the bottom/right to a multiple of b. Query (i, j) sits at
    pixel ``(s·i, s·j)`` (``stride`` s divides b: the queries of a block are every s-th pixel of it, a (b/s)×(b/s)
    grid) and attends to the keys of its block's window, the (b + 2h)×(b + 2h) pixels ``[r0 - h, r0 + b + h)`` ×
    ``[c0 - h, c0 + b + h)`` around the block ``[r0, r0 + b) × [c0, c0 + b)``. Window pixels outside the H×W map
    (the halo at the borders and the bottom/right padding) are, with ``pad_mode='zeros'`` (the default, HaloNet's:
    the paper extracts a fixed (b + 2h)² memory around every block of the zero-padded image and masks nothing, as
    timm's ``HaloAttn`` does), zero keys and values that take part in the softmax (their logit is the relative
    term alone); with ``pad_mode='mask'`` they are masked out of it (every query sees at least its own pixel).
    Logit of query (i, j) in block row/column (y, x) and key (a, c) (HaloNet's factorised relative embeddings, the
    embedding term scaled with q·k):

        scale · (q·k + q·(rel_h[a - r0 - r·y + win - 1] + rel_w[c - c0 - r·x + win - 1])),   win = b + 2h

    with r = ``rel_stride`` (default s, so that ``a - r0 - s·y = a - s·i``: offsets in input pixels; r = 1
    measures them in steps of the query grid, as timm's ``HaloAttn`` does with ``stride=2``).

    Args:
        q: [B, N, Hq, Wq, Dk] with Hq = ceil(H / stride), Wq = ceil(W / stride) (a stride-s projection of the map).
        k: [B, N, H, W, Dk].
        v: [B, N, H, W, Dv].
        block_size: side b of the blocks (>= 1).
        halo_size: halo h (>= 0).
        stride: s, a divisor of b (default 1).
        rel_h, rel_w: optional relative embeddings [2·win - 1, Dk], shared by the heads, in q's dtype; both or
            neither.
        scale: factor on the logits (default 1/sqrt(Dk)).
        pad_mode: ``'zeros'`` (default) or ``'mask'``: what the window slots outside the map are (see above).
        rel_stride: r, the step of the relative offsets per query row/column, 1 <= r <= stride (default stride).
        backend: ``'auto'`` (Triton on CUDA, else PyTorch; ``VISATTN_BACKEND`` overrides), ``'torch'`` or
            ``'triton'``.

    Returns:
        [B, N, Hq, Wq, Dv] in the inputs' dtype (softmax and accumulation in float32).

    Raises:
        ValueError, TypeError: wrong shapes, dtypes, devices or arguments (the message names the argument).
    """
    layout = '[B, N, H, W, D]'
    for t, name in ((q, 'q'), (k, 'k'), (v, 'v')):
        check_tensor(t, name, _OP, 5, layout)
    check_same((q, k, v), ('q', 'k', 'v'), _OP)
    check_positive_int(block_size, 'block_size', _OP)
    check_positive_int(halo_size, 'halo_size', _OP, minimum=0)
    check_positive_int(stride, 'stride', _OP)
    if block_size % stride:
        raise ValueError(f'{_OP}: stride={stride} must divide block_size={block_size}')
    if pad_mode not in PAD_MODES:
        raise ValueError(f'{_OP}: pad_mode must be one of {PAD_MODES}, got {pad_mode!r}')
    rel_stride = stride if rel_stride is None else check_positive_int(rel_stride, 'rel_stride', _OP)
    if rel_stride > stride:
        raise ValueError(f'{_OP}: rel_stride must be in [1, stride={stride}], got {rel_stride}')
    B, N, H, W, dk = k.shape
    if v.shape[:4] != k.shape[:4]:
        raise ValueError(f'{_OP}: v must be [B, N, H, W, Dv] with B, N, H, W = {(B, N, H, W)} like k, '
                         f'got {tuple(v.shape)}')
    want = (B, N, -(-H // stride), -(-W // stride), dk)
    if tuple(q.shape) != want:
        raise ValueError(f'{_OP}: q must be [B, N, ceil(H / stride), ceil(W / stride), Dk] = {want} for k of shape '
                         f'{tuple(k.shape)} and stride={stride}, got {tuple(q.shape)}')
    if (rel_h is None) != (rel_w is None):
        raise ValueError(f'{_OP}: rel_h and rel_w go together: pass both or neither')
    if rel_h is not None:
        size = 2 * (block_size + 2 * halo_size) - 1
        for t, name in ((rel_h, 'rel_h'), (rel_w, 'rel_w')):
            check_tensor(t, name, _OP, 2, '[2·(block_size + 2·halo_size) - 1, Dk]')
            if tuple(t.shape) != (size, dk):
                raise ValueError(f'{_OP}: {name} must be [2·(block_size + 2·halo_size) - 1, Dk] = {(size, dk)}, '
                                 f'got {tuple(t.shape)}')
        check_same((q, rel_h, rel_w), ('q', 'rel_h', 'rel_w'), _OP)
    scale = check_scale(scale, dk, _OP)
    if resolve_backend(backend, q, k, v, rel_h, rel_w, op=_OP) == 'triton' and q.numel() and k.numel():
        from .triton import halo_attention_2d_triton

        return halo_attention_2d_triton(q, k, v, block_size=block_size, halo_size=halo_size, stride=stride,
                                        rel_h=rel_h, rel_w=rel_w, scale=scale, pad_mode=pad_mode,
                                        rel_stride=rel_stride)
    return halo_attention_2d_naive(q, k, v, block_size, halo_size, stride, rel_h, rel_w, scale, pad_mode, rel_stride)
