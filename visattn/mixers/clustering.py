"""Attention restricted or approximated by k-means clusters: Routing Transformer, clustered and i-clustered attention.

Papers:
    - "Efficient Content-Based Sparse Attention with Routing Transformers", Roy, Saffar, Vaswani, Grangier,
      TACL 2021, arXiv:2003.05997 (https://arxiv.org/abs/2003.05997): ``routing``.
    - "Fast Transformers with Clustered Attention", Vyas, Katharopoulos, Fleuret, NeurIPS 2020,
      arXiv:2007.04825 (https://arxiv.org/abs/2007.04825): ``clustered`` and ``i_clustered`` (improved clustered).

``routing``: queries and keys are projected on the unit sphere and routed to ``num_clusters`` centroids
(a buffer, learned by online k-means: an exponential moving average of the vectors assigned to each
centroid, updated in training). As in the balanced variant of the paper, each cluster takes the
``w = ceil(N / k)`` queries and the ``w`` keys nearest to its centroid and attends within them; a
query chosen by several clusters combines them into one softmax, a query chosen by none gets zeros (the
paper mixes routing heads with local heads for that reason).

Causal ``routing`` (``is_causal=True``): within a cluster a query attends only to keys at positions <= its own.
The paper's causal language models share queries and keys: the released code (google-research
``routing_transformer``) sets ``share_qk=True`` in its language-model settings, and its decoder then uses
``k = q``, so the keys take the queries' routing (``K_idx = Q_idx``); it takes the balanced top-w of every cluster
over the whole sequence, sorts each cluster by position and masks the upper triangle of the w x w block, which is
positional only because queries and keys share the indices. That top-w is not causal: whether an early token is
among a cluster's w nearest depends on the later tokens. Here each token goes to the centroid nearest to its
query (a choice that depends on the token alone; its key follows it, ``K_idx = Q_idx``, so a query always sees
itself), and a query attends to the w most recent tokens of its cluster, itself included (the paper's
``w = ceil(N / k)``; a cluster holding more than w tokens becomes a sliding look-back, memory O(N·w)); padded
tokens form a cluster of their own (their rows are zeros). The keys are the ``k`` projection by default;
``share_qk=True`` uses the queries as the keys (the paper's language-model setting; the ``k`` third of ``qkv`` is
then unused), in both forms.

``clustered``: the queries are grouped into ``num_clusters`` clusters by k-means (Lloyd iterations) on their
LSH codes (``bits`` random hyperplanes, Hamming distance; ``bits=None`` clusters the queries themselves);
each cluster's centroid (the mean of its queries) attends to all keys and every query takes its cluster's
output. O(N·C) instead of O(N²).

``i_clustered`` (the paper's improved clustered attention, "i-clustered"): the same clusters and centroid
attention ``A^c_j = softmax(Q^c_j Kᵀ / sqrt(D))``; for each cluster j, ``T_j`` = its ``topk`` keys of largest
``A^c_j`` and ``m̂_j = Σ_{l ∈ T_j} A^c_jl``; query i of cluster j takes

    ``A^t_il = m̂_j · exp(q_i·k_l / sqrt(D)) / Σ_{r ∈ T_j} exp(q_i·k_r / sqrt(D))``  if l ∈ T_j, else ``A^c_jl``,

so its output is ``m̂_j · softmax_{T_j}(q_i Kᵀ) V_{T_j} + Σ_{l ∉ T_j} A^c_jl v_l``: exact attention on the keys the
centroid attends to most, the clustered approximation elsewhere. With ``topk >= N`` it is full softmax attention.
O(N·C + N·topk). The released code (fast-transformers) picks the top keys by the centroid's dot products, the
same order; it is followed here.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_float, check_int, masked_softmax_fp32
from ..ops._dispatch import upcast
from ..registry import register
from ._base import TokenMixer, softmax_attention
from ._sparse_utils import (
    SeededMixin,
    attention_lse,
    gather_rows,
    hash_normal,
    key_mask_of,
    window_attention_lse,
)

__all__ = ['RoutingAttention', 'ClusteredAttention', 'ImprovedClusteredAttention', 'routing_inputs']


def kmeans_assign(x: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid (Euclidean): ``x [..., N, D]``, ``centroids [..., C, D]`` -> ``[..., N]``.

    ``argmax_c (x·c - |c|²/2)``, the scores written once (one batched ``baddbmm``).
    """
    lead: list[int] = list(torch.broadcast_shapes(x.shape[:-2], centroids.shape[:-2]))
    n = 1  # not -1: the batch may be empty
    for s in lead:
        n *= s
    xs = x.expand(lead + list(x.shape[-2:])).reshape([n] + list(x.shape[-2:]))
    cs = centroids.expand(lead + list(centroids.shape[-2:])).reshape([n] + list(centroids.shape[-2:]))
    score = torch.baddbmm(-0.5 * cs.pow(2).sum(-1).unsqueeze(-2), xs, cs.transpose(-1, -2))
    return score.argmax(dim=-1).reshape(lead + [x.shape[-2]])


def cluster_means(x: Tensor, assign: Tensor, num_clusters: int, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Means of ``x [..., N, D]`` per cluster (``assign [..., N]``); returns ``(means [..., C, D], counts [..., C])``.

    ``weight [..., N]`` (0 or 1, broadcastable) leaves tokens out; an empty cluster has a zero mean and count 0.
    Memory O(N·D + C·D): no one-hot matrix.
    """
    w = torch.ones_like(assign, dtype=x.dtype) if weight is None else weight.to(x.dtype).expand(assign.shape)
    sums = x.new_zeros(list(x.shape[:-2]) + [num_clusters, x.shape[-1]]).scatter_add(
        -2, assign.unsqueeze(-1).expand_as(x), x * w.unsqueeze(-1))
    counts = w.new_zeros(list(assign.shape[:-1]) + [num_clusters]).scatter_add(-1, assign, w)
    return sums / counts.clamp_min(1).unsqueeze(-1), counts


@register(
    'routing', paper='Efficient Content-Based Sparse Attention with Routing Transformers', arxiv='2003.05997',
    year=2020, family='clustering', complexity='O(N²/k)', kind='mixer', supports_causal=True,
)
class RoutingAttention(TokenMixer):
    """Routing attention: each online k-means cluster attends among its nearest queries and keys.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`).
        num_clusters: k, the centroids per head (the paper: about sqrt(N)).
        decay: EMA decay of the online k-means update (the paper: 0.999).
        share_qk: use the queries as the keys (the paper's causal language models); default False (the ``k``
            projection, as timm's ``Attention``).
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask``: [B, N] bool key padding (True = real token).
    """

    supports_key_padding = True
    supports_causal = True

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
            num_clusters: int = 16,
            decay: float = 0.999,
            share_qk: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        self.num_clusters = check_int('num_clusters', num_clusters)
        self.decay = check_float('decay', decay, 0., 1., high_open=True)
        self.share_qk = share_qk
        self.register_buffer('centroids', torch.empty(num_heads, num_clusters, self.head_dim, device=device,
                                                      dtype=dtype))
        self.reset_centroids()

    def reset_centroids(self) -> None:
        """Random unit centroids."""
        if self.centroids.device.type != 'meta':
            with torch.no_grad():
                self.centroids.copy_(F.normalize(torch.randn(self.centroids.shape), dim=-1))

    def update_centroids(self, qn: Tensor, kn: Tensor, weight: Tensor) -> None:
        """One online k-means step: move each centroid toward the mean of the unit q and k routed to it (in the
        dtype of ``qn``, at least float32, also under autocast)."""
        with torch.no_grad(), torch.autocast('cuda', enabled=False), torch.autocast('cpu', enabled=False):
            self._update_centroids(qn, kn, weight)

    def _update_centroids(self, qn: Tensor, kn: Tensor, weight: Tensor) -> None:
        x = torch.cat([qn, kn], dim=-2).transpose(0, 1).flatten(1, 2)  # [H, B·2N, D], at least float32
        w = torch.cat([weight, weight], dim=-1).expand(qn.shape[0], qn.shape[1], -1).transpose(0, 1).flatten(1)
        old = self.centroids.to(x.dtype)
        means, counts = cluster_means(x, kmeans_assign(x, old), self.num_clusters, w)
        new = self.decay * old + (1 - self.decay) * means
        keep = (counts > 0).unsqueeze(-1)
        self.centroids.copy_(torch.where(keep, F.normalize(new, dim=-1), old))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        kpm, _ = self.check_input(x, attn_mask, is_causal)
        q, k, v = self.split_heads(x)
        with_norms = not (isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity))
        qr, kr = routing_inputs(x, q, k, self.qkv.weight, self.qkv.bias, with_norms)
        return self.merge_heads(self.route_and_attend(q, k, v, kpm, qr, kr, is_causal))

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        return self.route_and_attend(q, k, v, key_padding_mask, q, k, is_causal)

    def route_and_attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, q_route: Tensor, k_route: Tensor,
            is_causal: bool,
    ) -> Tensor:
        """`routed_attention` or, causal, `causal_routed_attention`, with the queries as keys under ``share_qk``."""
        if self.share_qk:
            k, k_route = q, q_route
        if is_causal:
            return self.causal_routed_attention(q, k, v, key_padding_mask, q_route, k_route)
        return self.routed_attention(q, k, v, key_padding_mask, q_route, k_route)

    def causal_routed_attention(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, q_route: Tensor, k_route: Tensor,
    ) -> Tensor:
        """Causal attention of ``q, k, v`` [B, H, N, D] within the clusters: each token goes to the centroid
        nearest to its query (``q_route``; its key follows it), and a query attends to the ``w = ceil(N / k)`` most
        recent tokens of its cluster, itself included (``k_route`` only moves the centroids, in training)."""
        B, H, N, D = q.shape
        w = min(N, -(-N // self.num_clusters))
        key_mask = key_mask_of(key_padding_mask, q)  # [B, 1, N]
        qn, kn, cluster = route_causal(q_route, k_route, self.centroids, key_mask)
        order = (cluster * N + torch.arange(N, device=q.device)).argsort(dim=-1)  # by cluster, then position
        dropout_p = self.attn_drop.p if self.training else 0.
        out, _ = window_attention_lse(
            gather_rows(q, order), gather_rows(k, order), gather_rows(v, order), window=w - 1, causal=True,
            key_mask=torch.gather(key_mask.expand(B, H, N), -1, order), scale=self.scale,
            tags=torch.gather(cluster, -1, order), dropout_p=dropout_p)
        if self.training:
            self.update_centroids(qn, kn, key_mask.to(qn.dtype))
        return gather_rows(out, order.argsort(dim=-1))

    def routed_attention(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, q_route: Tensor, k_route: Tensor,
    ) -> Tensor:
        """Attention of ``q, k, v`` [B, H, N, D] within the clusters that ``q_route``, ``k_route`` (the same
        vectors, possibly computed in a wider dtype; see `routing_inputs`) are routed to."""
        B, H, N, D = q.shape
        kc = self.num_clusters
        w = min(N, -(-N // kc))
        key_mask = key_mask_of(key_padding_mask, q)  # [B, 1, N]
        qn, kn, q_idx, k_idx = route(q_route, k_route, self.centroids, key_mask, w)
        qs = gather_rows(q.unsqueeze(2), q_idx)  # [B, H, k, w, D]
        ks, vs = gather_rows(k.unsqueeze(2), k_idx), gather_rows(v.unsqueeze(2), k_idx)
        mask = torch.gather(key_mask.unsqueeze(2).expand(B, H, kc, N), -1, k_idx).unsqueeze(-2)
        dropout_p = self.attn_drop.p if self.training else 0.
        out, lse = attention_lse(qs, ks, vs, mask, scale=self.scale, dropout_p=dropout_p)
        if self.training:
            self.update_centroids(qn, kn, key_mask.to(qn.dtype))
        # a query chosen by several clusters: one softmax over the union of their keys
        flat_idx, flat_lse = q_idx.flatten(2), lse.flatten(2)  # [B, H, k·w]
        empty_lse = -1e30  # EMPTY_LSE (a literal: TorchScript cannot read module-level numbers)
        top = torch.full((B, H, N), empty_lse, dtype=lse.dtype, device=q.device)
        top = top.scatter_reduce(-1, flat_idx, flat_lse, reduce='amax').detach()
        wts = torch.exp(flat_lse - torch.gather(top, -1, flat_idx)) * (flat_lse > empty_lse)
        num = torch.zeros(B, H, N, D, dtype=wts.dtype, device=q.device).index_put(  # summed in at least float32
            (torch.arange(B, device=q.device)[:, None, None], torch.arange(H, device=q.device)[None, :, None],
             flat_idx), out.flatten(2, 3).to(wts.dtype) * wts.unsqueeze(-1), accumulate=True)
        den = torch.zeros(B, H, N, dtype=wts.dtype, device=q.device).scatter_add(-1, flat_idx, wts)
        return (num / torch.where(den > 0, den, torch.ones_like(den)).unsqueeze(-1)).to(v.dtype)


@torch.fx.wrap
def route(q: Tensor, k: Tensor, centroids: Tensor, key_mask: Tensor, w: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Balanced routing: each centroid takes its ``w`` nearest queries and keys.

    The routing (unit vectors, their similarities to the centroids, the top-w) runs in at least float32, also
    under autocast: in 16 bits near-ties swap and whole clusters change. A leaf for `torch.fx`.

    Args:
        q, k: [B, H, N, D]; centroids: [H, C, D]; key_mask: [B, 1, N] bool (False = padding); w: tokens per cluster.

    Returns:
        ``(unit q, unit k [B, H, N, D], query indices, key indices [B, H, C, w])``.
    """
    with torch.no_grad():
        if torch.jit.is_scripting():  # TorchScript: an autocast device must be a constant
            return _route(q, k, centroids, key_mask, w)
        with torch.autocast('cuda', enabled=False), torch.autocast('cpu', enabled=False):  # any device, meta too
            return _route(q, k, centroids, key_mask, w)


@torch.fx.wrap
def route_causal(q: Tensor, k: Tensor, centroids: Tensor, key_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Causal routing: each token to the centroid nearest to its unit query (a choice that depends on the token
    alone); padded tokens to a cluster of their own, numbered ``C``. In at least float32, also under autocast (see
    `route`). A leaf for `torch.fx`.

    Args:
        q, k: [B, H, N, D]; centroids: [H, C, D]; key_mask: [B, 1, N] bool (False = padding).

    Returns:
        ``(unit q, unit k [B, H, N, D], cluster ids [B, H, N] in [0, C])``.
    """
    with torch.no_grad():
        if torch.jit.is_scripting():  # TorchScript: an autocast device must be a constant
            return _route_causal(q, k, centroids, key_mask)
        with torch.autocast('cuda', enabled=False), torch.autocast('cpu', enabled=False):  # any device, meta too
            return _route_causal(q, k, centroids, key_mask)


def _route_causal(q: Tensor, k: Tensor, centroids: Tensor, key_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    qn, kn = F.normalize(upcast(q), dim=-1), F.normalize(upcast(k), dim=-1)
    cluster = torch.einsum('bhnd,hcd->bhnc', qn, centroids.to(qn.dtype)).argmax(dim=-1)
    return qn, kn, cluster.masked_fill(~key_mask, centroids.shape[1])


def _route(q: Tensor, k: Tensor, centroids: Tensor, key_mask: Tensor, w: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    qn, kn = F.normalize(upcast(q), dim=-1), F.normalize(upcast(k), dim=-1)
    mu = centroids.to(qn.dtype)
    # padded tokens rank last (similarities are in [-1, 1]), so they never take the place of a real one
    pad = ~key_mask.unsqueeze(-2)
    q_idx = torch.einsum('bhnd,hcd->bhcn', qn, mu).masked_fill(pad, -2.).topk(w, dim=-1).indices
    k_idx = torch.einsum('bhnd,hcd->bhcn', kn, mu).masked_fill(pad, -2.).topk(w, dim=-1).indices
    return qn, kn, q_idx, k_idx


@torch.fx.wrap
def routing_inputs(
        x: Tensor, q: Tensor, k: Tensor, weight: Tensor, bias: Tensor | None, with_norms: bool,
) -> tuple[Tensor, Tensor]:
    """The q and k [B, H, N, D] that route, in float32 when the projection ran in 16 bits (a 16-bit module or
    autocast): recomputed from ``x`` [B, N, C] and the first two thirds of the ``qkv`` projection, so that the
    routing sees what a float32 module sees. With q/k norms (whose parameters may be 16-bit) ``q``, ``k`` are
    returned as they are (the routing still runs in float32 on them). A leaf for `torch.fx` (it tests dtypes)."""
    # one return after the branches: TorchScript fails an internal assert on a return before a with block
    if with_norms or q.dtype not in (torch.float16, torch.bfloat16):
        q32, k32 = q, k
    else:
        B, H, N, D = q.shape
        with torch.no_grad():
            w32, b32 = weight[:2 * H * D].float(), None if bias is None else bias[:2 * H * D].float()
            if torch.jit.is_scripting():  # TorchScript: an autocast device must be a constant
                qk = F.linear(x.float(), w32, b32)
            else:
                with torch.autocast('cuda', enabled=False), torch.autocast('cpu', enabled=False):
                    qk = F.linear(x.float(), w32, b32)
        qk = qk.reshape(B, N, 2, H, D).permute(2, 0, 3, 1, 4)
        q32, k32 = qk[0], qk[1]
    return q32, k32


@register(
    'clustered', paper='Fast Transformers with Clustered Attention', arxiv='2007.04825', year=2020,
    family='clustering', complexity='O(N·C)', kind='mixer',
)
class ClusteredAttention(SeededMixin, TokenMixer):
    """Clustered attention: the centroid of each query cluster attends, its members share the output.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`).
        num_clusters: C, query clusters per head (the paper: 25 to 200); capped at N.
        iterations: Lloyd iterations of k-means (the paper: 10).
        bits: LSH bits of the codes clustered (the paper: 63); None clusters the raw queries.
        seed: seed of the LSH hyperplanes (default None: drawn from torch's generator at construction, so every
            layer differs; kept in the state dict, see `SeededMixin`).
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask``: [B, N] bool key padding (True = real token; padded queries do
        not move the centroids).
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
            num_clusters: int = 100,
            iterations: int = 10,
            bits: int | None = 63,
            seed: int | None = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        self.num_clusters = check_int('num_clusters', num_clusters)
        self.iterations = check_int('iterations', iterations)
        self.bits = None if bits is None else check_int('bits', bits)
        self.init_seed(seed)

    def cluster(self, q: Tensor, weight: Tensor) -> Tensor:
        """k-means cluster ids ``[B, H, N]`` of the queries ``q [B, H, N, D]`` (``weight [B, 1, N]``: 0 = padding)."""
        with torch.no_grad():
            return self._cluster(q, weight)

    def _cluster(self, q: Tensor, weight: Tensor) -> Tensor:
        N, D = q.shape[-2], q.shape[-1]
        C = min(self.num_clusters, N)
        x = upcast(q)
        if self.bits is not None:
            planes = hash_normal(self.seed, [D, self.bits]).to(q.device, x.dtype)
            x = torch.sign(torch.matmul(x, planes))  # ±1 codes: squared distance = 4 · Hamming distance
        # initial centroids: C real queries evenly spaced among the real ones (padded queries last)
        valid = weight.expand(q.shape[:-1]) > 0  # [B, H, N]
        order = torch.argsort((~valid).to(torch.uint8), dim=-1, stable=True)
        n_valid = valid.sum(-1, keepdim=True).clamp_min(1)
        pick = (torch.linspace(0, 1, C, device=q.device) * (n_valid - 1)).round().long()  # [B, H, C]
        centroids = gather_rows(x, torch.gather(order, -1, pick))
        for _ in range(self.iterations):
            means, counts = cluster_means(x, kmeans_assign(x, centroids), C, weight)
            centroids = torch.where((counts > 0).unsqueeze(-1), means, centroids)
        return kmeans_assign(x, centroids)

    def query_clusters(self, q: Tensor, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Cluster ids ``[B, H, N]`` of the queries ``q [B, H, N, D]`` and the centroids ``[B, H, C, D]`` (the means
        of each cluster's real queries; a cluster of padding only: the plain mean of its padded queries)."""
        key_mask = key_mask_of(key_padding_mask, q)
        assign = self.cluster(q, key_mask)
        C = min(self.num_clusters, q.shape[-2])
        centroids, counts = cluster_means(q, assign, C, key_mask)  # [B, H, C, D]
        if key_padding_mask is not None:
            centroids = torch.where((counts > 0).unsqueeze(-1), centroids, cluster_means(q, assign, C)[0])
        return assign, centroids

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        assign, centroids = self.query_clusters(q, key_padding_mask)
        out = softmax_attention(centroids, k, v, key_padding_mask=key_padding_mask,
                                dropout_p=self.attn_drop.p if self.training else 0., scale=self.scale)
        return gather_rows(out, assign)


def _rows(x: Tensor, idx: Tensor) -> Tensor:
    """``x [B, H, M, F]``, ``idx [B, H, N]`` (int in [0, M)) -> ``x[b, h, idx[b, h, n]]`` ``[B, H, N, F]``: one
    ``index_select`` on the flattened rows (an index of N entries, not of N·F as a ``gather`` needs)."""
    B, H, M, F_ = x.shape
    offset = (torch.arange(B * H, device=idx.device) * M).view(B, H, 1)
    return x.flatten(0, 2).index_select(0, (idx + offset).flatten()).view(B, H, idx.shape[-1], F_)


@register(
    'i_clustered', paper='Fast Transformers with Clustered Attention (improved clustered attention)',
    arxiv='2007.04825', year=2020, family='clustering', complexity='O(N·C + N·k)', kind='mixer',
)
class ImprovedClusteredAttention(ClusteredAttention):
    """Improved clustered attention: clustered attention, with exact attention on each centroid's top-k keys.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`).
        num_clusters, iterations, bits, seed: the query clustering, as `ClusteredAttention`.
        topk: k, the keys per cluster attended exactly (the released code's default: 32); capped at N.
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask``: [B, N] bool key padding (True = real token).
    """

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
            num_clusters: int = 100,
            iterations: int = 10,
            bits: int | None = 63,
            seed: int | None = None,
            topk: int = 32,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            num_clusters=num_clusters, iterations=iterations, bits=bits, seed=seed, device=device, dtype=dtype)
        self.topk = check_int('topk', topk)

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        assign, centroids = self.query_clusters(q, key_padding_mask)
        B, H, N, D = q.shape
        key_mask = key_mask_of(key_padding_mask, q).unsqueeze(-2)  # [B, 1, 1, N]
        scores = torch.matmul(upcast(centroids), upcast(k).transpose(-1, -2)) * self.scale  # [B, H, C, N]
        weights = masked_softmax_fp32(scores, key_mask.expand_as(scores))  # A^c
        top = scores.masked_fill(~key_mask, float('-inf')).topk(min(self.topk, N), dim=-1).indices  # T_j [B, H, C, k]
        in_top = torch.zeros_like(weights, dtype=torch.bool).scatter(-1, top, True)
        rest = weights.masked_fill(in_top, 0.)  # A^c outside T_j
        dropout_p = self.attn_drop.p if self.training else 0.
        mass = torch.gather(weights, -1, top).sum(-1)  # m̂_j = Σ_{l ∈ T_j} A^c_jl
        far = torch.matmul(F.dropout(rest, dropout_p, self.training).to(v.dtype), v)  # [B, H, C, D]
        kk = top.shape[-1]
        key_real = torch.gather(key_mask.squeeze(-2).expand(B, H, N), -1, top.flatten(2)).unflatten(2, (-1, kk))
        k_top = _rows(_rows(k, top.flatten(2)).unflatten(2, (-1, kk)).flatten(3), assign).unflatten(-1, (kk, D))
        v_top = _rows(_rows(v, top.flatten(2)).unflatten(2, (-1, kk)).flatten(3), assign)
        real = _rows(key_real.to(q.dtype), assign) > 0.5  # [B, H, N, k]
        near, _ = attention_lse(
            q.unsqueeze(-2), k_top, v_top.unflatten(-1, (kk, v.shape[-1])), real.unsqueeze(-2), scale=self.scale,
            dropout_p=dropout_p)  # [B, H, N, 1, D]: softmax over T_j, the keys of the query's cluster
        m_i = torch.gather(mass, -1, assign).unsqueeze(-1)  # [B, H, N, 1]
        return (near.squeeze(-2) * m_i.to(v.dtype) + gather_rows(far, assign)).to(v.dtype)
