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
of queries of one pair of residue classes against its ``span_y × span_x`` band of keys: one dense attention with
an additive bias (NAT's table entry of each pair, ``-inf`` off the query's window). Dilation needs no separate pass:
the tiles of all residue classes are batched together.

Two forms compute it:

- chunked (the default in eager mode): a chunk is a few tiles of one head group (whole heads when they fit),
  taken image by image, at most ``chunk`` score elements (`default_chunk`), so that its scores, bias and key band
  stay in a core's cache. Per chunk: a gather of the query tiles and of the key-and-value band (keys and values
  side by side, one gather), one ``baddbmm`` for the biased scores, the softmax, one ``bmm`` with the values, and
  an ``index_copy_`` of the outputs to their map positions. Its backward recomputes the chunk's weights (the
  flash-attention identity ``dS = P ⊙ (dO·Vᵀ - rowsum(dO ⊙ O))``) and adds the gradients of the queries, keys,
  values and bias table with ``index_add_``; nothing of the size of the scores is kept between the passes.
- every tile at once (``chunk=0``; under ``torch.compile``, ``torch.export`` and tracing, where the chunk loop
  would be unrolled): one gather each of the query tiles and the key and value bands, one batched matmul for the
  scores ``[B, H, tiles, t_y·t_x, span_y·span_x]``, the bias, the softmax, the values, and one gather back; plain
  autograd gives the backward and keeps the scores for it.

Cost: ``span² / k²`` more multiply-adds than the k² products a query needs (2× at k = 7 with t = 4), done by
BLAS. Memory of the chunked form: the inputs in the compute dtype, the output, and one chunk's work (a few hundred
KB); of the all-at-once form: the scores ``[B, H, Hs·Ws, span²]`` and the gathered bands, kept for the backward.
Every query sees exactly k² keys, so no softmax row is empty.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ['class_tiles', 'default_tile', 'neighborhood_attention_2d_blocked']


def default_tile(kernel_size: int, chunked: bool = True) -> int:
    """Query tile side (measured on 2 CPU threads and on one, k = 3-7). The chunked path: 4 (16 queries against
    10×10 keys at k = 7; smaller tiles waste less of the scores, and the chunk keeps them in cache). Every tile at
    once: 4 up to k = 5, 8 above (64 queries against 14×14 keys at k = 7, where the larger matmuls gain more than
    the band wastes)."""
    return 4 if chunked or kernel_size <= 5 else 8


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


class _Plan:
    """The tiles and key bands of a map, for both axes at once (see `class_tiles`), and the table entry of every
    (tile query, band key) pair: ``entry`` [n, m, s] indexes the flattened ``[H, (2k-1)²]`` bias table, and the extra
    column ``(2k-1)²`` (a ``-inf`` logit) for a key outside the query's window."""

    def __init__(self, hs: int, ws: int, kernel_size: int, dilation: int, tile: int, device: torch.device) -> None:
        qy, ky, inside_y, row_y, slot_y = class_tiles(hs, kernel_size, dilation, tile, device)
        qx, kx, inside_x, row_x, slot_x = class_tiles(ws, kernel_size, dilation, tile, device)
        ny, ty, sy = inside_y.shape
        nx, tx, sx = inside_x.shape
        self.n, self.m, self.s = ny * nx, ty * tx, sy * sx
        self.queries = _pairs(qy, qx, ws).view(self.n, self.m)  # map position of every tile query
        self.keys = _pairs(ky, kx, ws).view(self.n, self.s)  # map position of every band key
        size = 2 * kernel_size - 1
        inside = (inside_y[:, None, :, None, :, None] & inside_x[None, :, None, :, None, :]).reshape(self.n, self.m,
                                                                                                      self.s)
        entry = (row_y[:, None, :, None, :, None] * size + row_x[None, :, None, :, None, :]).reshape(self.n, self.m,
                                                                                                     self.s)
        self.entry = entry.masked_fill(~inside, size * size)
        # the tile slot of map position (y, x): ((tile_y·nX + tile_x)·ty + row in tile)·tx + column in tile
        slot = ((slot_y[:, None] // ty * nx + slot_x[None, :] // tx) * ty + slot_y[:, None] % ty) * tx \
            + slot_x[None, :] % tx
        self.slot = slot.reshape(-1)
        self.repeats = self.n * self.m > hs * ws  # some tiles repeat a query: only its slot's copy counts
        primary = torch.zeros(self.n * self.m, dtype=torch.bool, device=device)
        primary[self.slot] = True
        self.primary = primary.view(self.n, self.m)


def _table(rpb: Tensor | None, heads: int, kernel_size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The bias table ``[H, (2k-1)² + 1]`` in the compute dtype: the flattened ``rpb`` (zeros without one) and a
    last column of ``-inf`` for the keys outside a query's window."""
    size = (2 * kernel_size - 1) ** 2
    table = torch.zeros(heads, size, dtype=dtype, device=device) if rpb is None else rpb.to(dtype).reshape(heads, size)
    return torch.cat([table, torch.full((heads, 1), float('-inf'), dtype=dtype, device=device)], 1)


class _Chunk:
    """One chunk of the chunked path: heads h0:h1 and tiles c0:c1 (of every image in turn), with the flat rows of
    its queries and key bands in a [H·Hs·Ws, D] map, its bias entries, and where its outputs go."""

    def __init__(self, plan: _Plan, h0: int, h1: int, c0: int, c1: int, length: int) -> None:
        self.h0, self.h1, self.heads, self.tiles = h0, h1, h1 - h0, c1 - c0
        base = torch.arange(h0, h1, device=plan.queries.device)[:, None] * length
        self.q_rows = (base + plan.queries[c0:c1].reshape(1, -1)).reshape(-1)
        self.k_rows = (base + plan.keys[c0:c1].reshape(1, -1)).reshape(-1)
        self.entry = plan.entry[c0:c1].reshape(-1)
        # the tile queries that are computed for their map position (a repeated query's copy is dropped)
        self.dst = plan.queries[c0:c1].reshape(-1)
        self.keep: Tensor | None = None
        self.mask: Tensor | None = None
        if plan.repeats:
            primary = plan.primary[c0:c1]
            self.keep = primary.reshape(-1).nonzero().squeeze(1)
            self.dst = self.dst.index_select(0, self.keep)
            self.mask = primary[None, :, :, None].expand(self.heads, -1, -1, -1).reshape(-1, plan.m, 1)


def _chunks(plan: _Plan, heads: int, length: int, budget: int) -> list[_Chunk]:
    """Chunks of at most ``budget`` score elements per image (at least one tile); heads are grouped only when a
    chunk holds every tile."""
    per_tile = plan.m * plan.s
    g = max(1, min(plan.n, budget // per_tile))
    gh = max(1, min(heads, budget // (per_tile * plan.n))) if g == plan.n else 1
    return [_Chunk(plan, h0, min(heads, h0 + gh), c0, min(plan.n, c0 + g), length)
            for h0 in range(0, heads, gh) for c0 in range(0, plan.n, g)]


def _chunk_weights(qc: Tensor, kv: Tensor, bias: Tensor, c: _Chunk, b: int, plan: _Plan,
                   scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Chunk c of image b: its query tiles qt [G, m, Dk], its key-and-value bands kvt [G, s, Dk + Dv], and the
    attention weights softmax(scale·q·kᵀ + bias) [G, m, s] over the band."""
    dk = qc.shape[-1]
    qt = qc[b].index_select(0, c.q_rows).view(-1, plan.m, dk)
    kvt = kv[b].index_select(0, c.k_rows).view(-1, plan.s, kv.shape[-1])
    p = torch.softmax(torch.baddbmm(bias, qt, kvt[..., :dk].transpose(1, 2), alpha=scale), dim=-1)
    return p, qt, kvt


class _ChunkedNA(torch.autograd.Function):
    """Neighbourhood attention chunk by chunk (a few tiles of one head group, image by image), so that the scores
    of a chunk stay in cache; the backward recomputes them chunk by chunk (memory: the inputs and the output, not
    the scores). The queries and the keys-and-values (side by side, one gather per band) are first made
    contiguous in the compute dtype, so that every gather reads whole rows."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, table: Tensor, plan: _Plan, scale: float, budget: int) -> Tensor:
        B, H, hs, ws, dk = q.shape
        dv, length, ct = v.shape[-1], hs * ws, table.dtype
        chunks = _chunks(plan, H, length, budget)
        qc = q.to(ct).contiguous().view(B, H * length, dk)
        kv = torch.cat([k.to(ct), v.to(ct)], -1).view(B, H * length, dk + dv)
        # the output in [B, Hs·Ws, H, Dv] (the layout the layer's projection reads), returned as a [B, H, ...] view
        out = torch.empty(B, length, H, dv, dtype=q.dtype, device=q.device)
        for c in chunks:
            bias = table[c.h0:c.h1].index_select(1, c.entry).view(-1, plan.m, plan.s)
            for b in range(B):
                p, _, kvt = _chunk_weights(qc, kv, bias, c, b, plan, scale)
                o = torch.bmm(p, kvt[..., dk:]).view(c.heads, -1, dv)
                if c.keep is not None:
                    o = o.index_select(1, c.keep)
                out[b, :, c.h0:c.h1].index_copy_(0, c.dst, o.transpose(0, 1).to(q.dtype))
        out = out.view(B, hs, ws, H, dv).permute(0, 3, 1, 2, 4)
        ctx.save_for_backward(qc, kv, table, out)
        ctx.plan, ctx.scale, ctx.chunks, ctx.dtypes = plan, scale, chunks, (q.dtype, k.dtype, v.dtype)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        qc, kv, table, out = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        B, H, hs, ws, dv = out.shape
        dk, ct = qc.shape[-1], table.dtype
        grad = grad.to(ct)
        delta = (grad * out.to(ct)).sum(-1).view(B, -1)  # [B, H·Hs·Ws]: Σ_d dO·O, the softmax backward's row term
        grad = grad.contiguous().view(B, -1, dv)
        dq = torch.zeros_like(qc)
        dk_ = torch.zeros_like(qc)
        dv_ = torch.zeros(B, H * hs * ws, dv, dtype=ct, device=qc.device)
        dtable = torch.zeros_like(table) if ctx.needs_input_grad[3] else None
        for c in ctx.chunks:
            bias = table[c.h0:c.h1].index_select(1, c.entry).view(-1, plan.m, plan.s)
            ds_sum = torch.zeros_like(bias) if dtable is not None else None
            for b in range(B):
                p, qt, kvt = _chunk_weights(qc, kv, bias, c, b, plan, scale)  # p [G, m, s]
                kt, vt = kvt[..., :dk], kvt[..., dk:]
                do = grad[b].index_select(0, c.q_rows).view(-1, plan.m, dv)
                rows = delta[b].index_select(0, c.q_rows).view(-1, plan.m, 1)
                if c.mask is not None:  # a repeated query's copy carries no gradient
                    do, rows = do * c.mask, rows * c.mask
                ds = torch.bmm(do, vt.transpose(1, 2)).sub_(rows).mul_(p)  # dL/d(logit)
                if ds_sum is not None:
                    ds_sum += ds
                dq[b].index_add_(0, c.q_rows, torch.bmm(ds, kt).view(-1, dk), alpha=scale)
                dk_[b].index_add_(0, c.k_rows, torch.bmm(ds.transpose(1, 2), qt).view(-1, dk), alpha=scale)
                dv_[b].index_add_(0, c.k_rows, torch.bmm(p.transpose(1, 2), do).view(-1, dv))
            if dtable is not None:
                dtable[c.h0:c.h1].index_add_(1, c.entry, ds_sum.view(c.heads, -1))
        tq, tk, tv = ctx.dtypes
        return (dq.view(B, H, hs, ws, dk).to(tq), dk_.view(B, H, hs, ws, dk).to(tk), dv_.view(B, H, hs, ws, dv).to(tv),
                dtable, None, None, None)


def default_chunk() -> int:
    """Score elements per chunk of the chunked path: 2^16 (256 KB of float32 scores; with t = 4 and k = 7 the
    chunk's key-and-value band of 64-wide heads is 4× that, about a core's 1 MB L2; measured against 2^13-2^21)."""
    return 1 << 16


def neighborhood_attention_2d_blocked(q: Tensor, k: Tensor, v: Tensor, kernel_size: int, dilation: int = 1,
                                      rpb: Tensor | None = None, scale: float | None = None,
                                      tile: int | None = None, chunk: int | None = None) -> Tensor:
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
        chunk: score elements per chunk (default `default_chunk`); ``0`` computes every tile at once with plain
            autograd, as it is done under ``torch.compile``, ``torch.export``, tracing and on the meta device.

    Returns:
        [B, H, Hs, Ws, Dv] in ``q``'s dtype (computed in float32, float64 for float64 inputs); the chunked path
        returns a view of a [B, Hs, Ws, H, Dv] tensor.

    Raises:
        ValueError: ``tile`` is not a positive int, or ``chunk`` not a non-negative int.
    """
    B, H, hs, ws, dk = q.shape
    scale = dk ** -0.5 if scale is None else scale
    chunk = default_chunk() if chunk is None else chunk
    if not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f'neighborhood_attention_2d_blocked: chunk must be a non-negative int, got {chunk!r}')
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or q.device.type == 'meta':
        chunk = 0
    tile = default_tile(kernel_size, chunk > 0) if tile is None else tile
    if not isinstance(tile, int) or tile < 1:
        raise ValueError(f'neighborhood_attention_2d_blocked: tile must be a positive int, got {tile!r}')
    plan = _Plan(hs, ws, kernel_size, dilation, tile, q.device)
    table = _table(rpb, H, kernel_size, torch.promote_types(q.dtype, torch.float32), q.device)
    if chunk > 0 and q.numel() > 0:
        return _ChunkedNA.apply(q, k, v, table, plan, scale, chunk)
    return _all_tiles(q, k, v, table, plan, scale)


def _all_tiles(q: Tensor, k: Tensor, v: Tensor, table: Tensor, plan: _Plan, scale: float) -> Tensor:
    """Every tile at once, plain autograd: one gather each of the query tiles and the key and value bands, one
    batched matmul for the scores [B, H, n, m, s], the bias and mask, softmax, the values, and one gather back."""
    B, H, hs, ws, dk = q.shape
    dv = v.shape[-1]
    n, m, s = plan.n, plan.m, plan.s
    qf, kf, vf = q.to(table.dtype), k.to(table.dtype), v.to(table.dtype)
    keys = plan.keys.reshape(-1)
    qt = qf.reshape(B, H, hs * ws, dk).index_select(2, plan.queries.reshape(-1)).view(B, H, n, m, dk)
    kt = kf.reshape(B, H, hs * ws, dk).index_select(2, keys).view(B, H, n, s, dk)
    vt = vf.reshape(B, H, hs * ws, dv).index_select(2, keys).view(B, H, n, s, dv)
    bias = table.index_select(1, plan.entry.reshape(-1)).view(H, n, m, s)
    scores = torch.matmul(qt * scale, kt.transpose(-1, -2)).add_(bias)  # [B, H, n, m, s]
    out = torch.matmul(torch.softmax(scores, dim=-1), vt).view(B, H, n * m, dv)
    return out.index_select(2, plan.slot).view(B, H, hs, ws, dv).to(q.dtype)
