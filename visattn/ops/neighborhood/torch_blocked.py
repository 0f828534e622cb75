"""The fast PyTorch path of 2-D neighbourhood attention: query tiles against their key halo, as batched matmuls.

Papers: "Neighborhood Attention Transformer", Hassani, Walton, Li, Li, Shi, CVPR 2023, arXiv:2204.07143
(https://arxiv.org/abs/2204.07143); "Dilated Neighborhood Attention Transformer", Hassani, Shi, 2022,
arXiv:2209.15001 (https://arxiv.org/abs/2209.15001).

The function is the spec's (`neighborhood_attention_2d_naive`): for the query at (y, x),

    out[y, x] = Σ_{(ky, kx) ∈ ρ(y) × ρ(x)} softmax(s · q[y, x]·k[ky, kx] + rpb[(ky - y)/d + k - 1, (kx - x)/d + k - 1])
                · v[ky, kx],

where ``ρ(i)`` is NATTEN's window along one axis: the ``k`` positions ``i + d·t`` (``|t| <= k//2``) of the query's
residue class ``i mod d``, shifted as a whole to stay inside the map at the borders.

How it is computed. Along each axis, the positions of every residue class (each a map of dilation 1) are cut into
tiles of ``t`` consecutive class positions (``t`` close to ``tile``, see `default_tile`; the same for every class;
a tile that runs past its class repeats its last query). The windows of a tile's queries all lie in a band of
``span = t + k - 1`` consecutive class positions (the whole class when it is shorter) that starts at
``clamp(first query - k//2, 0, class length - span)``: a window starts at or after ``i - k//2`` unless the far
border moved it back, and then not before ``length - k``, which the band holds. A 2-D tile is a ``t_y × t_x`` block
of queries of one pair of residue classes against its ``span_y × span_x`` band of keys. Per call: one gather each
of the query tiles and of the key and value bands (a single ``index_select`` over the flattened map; its backward
is an ``index_add``, far cheaper than the scatter of advanced indexing), one batched matmul for the scores
``[B, H, tiles, t_y·t_x, span_y·span_x]``, an additive mask (``-inf`` off each query's window, plus the bias
gathered once per tile pattern with ``F.embedding`` on the table), the softmax, one batched matmul with the values,
and one ``index_select`` that puts every query back at its place. Plain autograd gives the backward. Dilation
needs no separate pass: the tiles of all residue classes are batched together.

Cost: ``span² / k²`` more multiply-adds than the k² products a query needs (4× at k = 7 with t = 8, 4× at k = 3
with t = 4), done by BLAS. Memory: the scores ``[B, H, Hs·Ws, span²]`` and the gathered bands (about
``(span / t)²`` times the keys and values), against the naive path's gathered keys and values for each of its k²
window offsets, all kept for its backward. Every query sees exactly k² keys, so no softmax row is empty.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._dispatch import upcast

__all__ = ['class_tiles', 'default_tile', 'neighborhood_attention_2d_blocked']


def default_tile(kernel_size: int) -> int:
    """Query tile side of the fast path (measured on 2 CPU threads): 4 up to k = 5 (16 queries against 6×6 or 8×8
    keys), 8 above (64 queries against 14×14 keys at k = 7, where the matmuls gain more than the band wastes)."""
    return 4 if kernel_size <= 5 else 8


def class_tiles(length: int, kernel_size: int, dilation: int, tile: int,
                device: torch.device | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The query tiles and key bands of one axis, residue class by residue class (NATTEN's windows).

    Class ``r`` holds ``g_r = ceil((length - r) / d)`` positions ``r + d·j``. Every class is cut into ``n``
    tiles of ``t`` class positions, ``n = ceil(g_0 / tile)``, ``t = ceil(g_0 / n)`` (``g_0`` the longest class); a
    tile that runs past its class repeats its last query (computed twice, used once).

    Returns:
        queries: [d·n, t] map positions of the queries of every tile (class-major).
        keys: [d·n, span] map positions of the key band of every tile (clamped into the class).
        inside: [d·n, t, span] bool: band key s is in the window of tile query i (never a clamped repeat).
        row: [d·n, t, span] bias row ``(key - query) / d + k - 1``, clamped into the table (exact where inside).
        slot: [length] the index, in the flattened [d·n, t] queries, where each map position is computed.
    """
    longest = -(-length // dilation)
    n = -(-longest // tile)
    t = -(-longest // n)
    span = min(t + kernel_size - 1, longest)
    r = torch.arange(dilation, device=device)[:, None, None]  # [d, 1, 1]
    g = (length - r + dilation - 1) // dilation  # class lengths
    first = torch.arange(n, device=device)[None, :, None] * t  # [1, n, 1] first query of every tile
    qj = torch.minimum(first + torch.arange(t, device=device), g - 1)  # [d, n, t] class positions
    band = torch.minimum((first - kernel_size // 2).clamp(min=0), g - span).clamp(min=0)  # [d, n, 1]
    kj = band + torch.arange(span, device=device)  # [d, n, span]
    start = torch.minimum((qj - kernel_size // 2).clamp(min=0), g - kernel_size)  # [d, n, t] window starts
    offset = kj[:, :, None, :] - start[..., None]  # [d, n, t, span]
    inside = (offset >= 0) & (offset < kernel_size) & (kj < g)[:, :, None, :]
    row = (kj[:, :, None, :] - qj[..., None] + kernel_size - 1).clamp(0, 2 * kernel_size - 2)
    queries = (r + dilation * qj).reshape(dilation * n, t)
    keys = (r + dilation * torch.minimum(kj, g - 1)).reshape(dilation * n, span)
    i = torch.arange(length, device=device)
    slot = (i % dilation) * (n * t) + i // dilation
    return queries, keys, inside.reshape(dilation * n, t, span), row.reshape(dilation * n, t, span), slot


def _pairs(rows: Tensor, cols: Tensor, width: int) -> Tensor:
    """Flat map positions ``row·width + col`` of every tile pair: rows [nY, a], cols [nX, b] -> [nY·nX·a·b]."""
    return (rows[:, None, :, None] * width + cols[None, :, None, :]).reshape(-1)


def neighborhood_attention_2d_blocked(q: Tensor, k: Tensor, v: Tensor, kernel_size: int, dilation: int = 1,
                                      rpb: Tensor | None = None, scale: float | None = None,
                                      tile: int | None = None) -> Tensor:
    """k×k neighbourhood attention (NATTEN's borders, dilation, NAT's bias) by query tiles and key bands.

    The same function as `neighborhood_attention_2d_naive` (arguments unchecked: the public op checks them).

    Args:
        q, k: [B, H, Hs, Ws, Dk] with ``Hs // dilation >= kernel_size`` and ``Ws // dilation >= kernel_size``.
        v: [B, H, Hs, Ws, Dv].
        kernel_size: odd window size k.
        dilation: step between window positions.
        rpb: [H, 2k-1, 2k-1] bias indexed by ``(key - query) / dilation + k - 1`` along each axis, or None.
        scale: factor on q·k (default 1/sqrt(Dk)).
        tile: query tile side along each axis (default `default_tile`); any value gives the same function.

    Returns:
        [B, H, Hs, Ws, Dv] in ``q``'s dtype (computed in float32, float64 for float64 inputs).

    Raises:
        ValueError: ``tile`` is not a positive int.
    """
    B, H, hs, ws, dk = q.shape
    dv = v.shape[-1]
    scale = dk ** -0.5 if scale is None else scale
    tile = default_tile(kernel_size) if tile is None else tile
    if not isinstance(tile, int) or tile < 1:
        raise ValueError(f'neighborhood_attention_2d_blocked: tile must be a positive int, got {tile!r}')
    qy, ky, inside_y, row_y, slot_y = class_tiles(hs, kernel_size, dilation, tile, q.device)
    qx, kx, inside_x, row_x, slot_x = class_tiles(ws, kernel_size, dilation, tile, q.device)
    ny, ty, sy = inside_y.shape
    nx, tx, sx = inside_x.shape
    n, m, s = ny * nx, ty * tx, sy * sx
    qf, kf, vf = upcast(q), upcast(k), upcast(v)
    keys = _pairs(ky, kx, ws)
    qt = qf.reshape(B, H, hs * ws, dk).index_select(2, _pairs(qy, qx, ws)).view(B, H, n, m, dk)
    kt = kf.reshape(B, H, hs * ws, dk).index_select(2, keys).view(B, H, n, s, dk)
    vt = vf.reshape(B, H, hs * ws, dv).index_select(2, keys).view(B, H, n, s, dv)
    outside = ~(inside_y[:, None, :, None, :, None] & inside_x[None, :, None, :, None, :]).reshape(n, m, s)
    if rpb is None:
        bias = torch.zeros(n, m, s, dtype=qf.dtype, device=q.device)
    else:
        size = 2 * kernel_size - 1
        entry = row_y[:, None, :, None, :, None] * size + row_x[None, :, None, :, None, :]  # [nY, nX, ty, tx, sy, sx]
        table = rpb.to(qf.dtype).reshape(H, size * size).t()  # [(2k-1)², H] in the compute dtype
        bias = F.embedding(entry.reshape(n, m, s), table).permute(3, 0, 1, 2)  # [H, n, m, s]
    bias = bias.masked_fill(outside, float('-inf'))
    scores = torch.matmul(qt * scale, kt.transpose(-1, -2)).add_(bias)  # [B, H, n, m, s]
    out = torch.matmul(torch.softmax(scores, dim=-1), vt).view(B, H, n * m, dv)
    # the tile slot of map position (y, x): ((tile_y·nX + tile_x)·ty + row in tile)·tx + column in tile
    slot = ((slot_y[:, None] // ty * nx + slot_x[None, :] // tx) * ty + slot_y[:, None] % ty) * tx \
        + slot_x[None, :] % tx
    return out.index_select(2, slot.reshape(-1)).view(B, H, hs, ws, dv).to(q.dtype)
