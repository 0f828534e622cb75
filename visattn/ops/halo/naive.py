"""PyTorch path of HaloNet's blocked local attention: the spec, and the vectorised CPU path.

The key map is cut into b×b blocks (zero-padded at the bottom/right to a multiple of b); each block's queries (every
``stride``-th pixel of the block, a (b/s)×(b/s) grid) attend to the block's (b + 2h)×(b + 2h) window, unfolded with
zero padding around the map; window slots outside the map are zero keys and values in the softmax
(``pad_mode='zeros'``) or are masked out of it (``pad_mode='mask'``). The logits of one block are a
[(b/s)², (b + 2h)²] matrix, so memory is O(Hq·Wq·(b + 2h)²) and no HW×HW matrix is formed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._utils import masked_softmax_fp32, softmax_fp32
from .._dispatch import upcast


def halo_rel_index(block_size: int, halo_size: int, stride: int = 1, device: torch.device | None = None,
                   rel_stride: int | None = None) -> Tensor:
    """Row of the relative embedding used by query row ``y`` of a block and key row ``u`` of its window: [b/s, win].

    Query row ``y`` sits at pixel ``s·y`` of the block, key row ``u`` at pixel ``u - h``: the offset key - query is
    ``u - h - r·y``, stored at ``offset + win - 1`` in a table of ``2·win - 1`` rows (win = b + 2h), with r =
    ``rel_stride`` (default s: offsets in input pixels; 1: in steps of the query grid). The same index serves the
    columns.
    """
    win = block_size + 2 * halo_size
    rel_stride = stride if rel_stride is None else rel_stride
    rows = torch.arange(block_size // stride, device=device)
    cols = torch.arange(win, device=device)
    return cols[None, :] - halo_size - rel_stride * rows[:, None] + win - 1


def _windows(t: Tensor, block_size: int, halo_size: int, nh: int, nw: int) -> Tensor:
    """[B, N, H, W, D] -> [B, N, nh, nw, win², D]: each block's window, zero outside the map."""
    b, h, win = block_size, halo_size, block_size + 2 * halo_size
    t = F.pad(t, (0, 0, h, h + nw * b - t.shape[3], h, h + nh * b - t.shape[2]))
    t = t.unfold(2, win, b).unfold(3, win, b)  # [B, N, nh, nw, D, win, win]
    return t.flatten(-2).transpose(-1, -2)


def halo_attention_2d_naive(q: Tensor, k: Tensor, v: Tensor, block_size: int, halo_size: int, stride: int = 1,
                            rel_h: Tensor | None = None, rel_w: Tensor | None = None,
                            scale: float | None = None, pad_mode: str = 'zeros', rel_stride: int | None = None
                            ) -> Tensor:
    """Blocked local attention with halos (see ``halo_attention_2d`` for the definition).

    Args:
        q: [B, N, Hq, Wq, Dk] with Hq = ceil(H / stride), Wq = ceil(W / stride).
        k: [B, N, H, W, Dk]; v: [B, N, H, W, Dv].
        block_size, halo_size, stride: b, h and s.
        rel_h, rel_w: [2·(b + 2h) - 1, Dk] relative embeddings (both or neither).
        scale: factor on the logits (default 1/sqrt(Dk)).
        pad_mode: ``'zeros'`` (window slots outside the map are zero keys and values) or ``'mask'`` (masked out).
        rel_stride: step r of the relative offsets per query row/column (default ``stride``).

    Returns:
        [B, N, Hq, Wq, Dv] in ``q``'s dtype (softmax and accumulation in at least float32).
    """
    B, N, H, W, dk = k.shape
    hq, wq = q.shape[2], q.shape[3]
    b, s = block_size, stride
    bq = b // s
    nh, nw = -(-H // b), -(-W // b)
    scale = dk ** -0.5 if scale is None else scale
    # queries: [B, N, Hq, Wq, Dk] -> zero-padded [B, N, nh, nw, bq, bq, Dk]
    qb = F.pad(upcast(q), (0, 0, 0, nw * bq - wq, 0, nh * bq - hq)).reshape(B, N, nh, bq, nw, bq, dk).transpose(3, 4)
    kw = _windows(upcast(k), b, halo_size, nh, nw)  # [B, N, nh, nw, win², D]
    vw = _windows(upcast(v), b, halo_size, nh, nw)
    logits = qb.flatten(4, 5) @ kw.transpose(-1, -2)  # [B, N, nh, nw, bq², win²]
    if rel_h is not None and rel_w is not None:
        index = halo_rel_index(b, halo_size, s, q.device, rel_stride)
        eh = upcast(rel_h)[index]  # [bq, win, Dk]
        ew = upcast(rel_w)[index]
        lh = torch.einsum('...yxd,yud->...yxu', qb, eh)  # [B, N, nh, nw, bq, bq, win]
        lw = torch.einsum('...yxd,xud->...yxu', qb, ew)
        logits = logits + (lh[..., :, None] + lw[..., None, :]).flatten(-2).flatten(4, 5)
    if pad_mode == 'mask':
        # [1, 1, nh, nw, 1, win²]: window slots inside the map
        inside = _windows(q.new_ones(1, 1, H, W, 1), b, halo_size, nh, nw)[..., None, :, 0] > 0
        attn = masked_softmax_fp32(logits * scale, inside)
    else:
        attn = softmax_fp32(logits * scale, dim=-1)  # the zero keys outside the map take part
    out = (attn @ vw).unflatten(4, (bq, bq)).transpose(3, 4)  # [B, N, nh, bq, nw, bq, Dv]
    return out.reshape(B, N, nh * bq, nw * bq, v.shape[-1])[:, :, :hq, :wq].to(q.dtype)
