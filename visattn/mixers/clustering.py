"""Attention restricted or approximated by k-means clusters: Routing Transformer and clustered attention.

Papers:
    - "Efficient Content-Based Sparse Attention with Routing Transformers", Roy, Saffar, Vaswani, Grangier,
      TACL 2021, arXiv:2003.05997 (https://arxiv.org/abs/2003.05997): ``routing``.
    - "Fast Transformers with Clustered Attention", Vyas, Katharopoulos, Fleuret, NeurIPS 2020,
      arXiv:2007.04825 (https://arxiv.org/abs/2007.04825): ``clustered``.

``routing``: queries and keys are projected on the unit sphere and routed to ``num_clusters`` centroids
(a buffer, learned by online k-means: an exponential moving average of the vectors assigned to each
centroid, updated in training). As in the balanced variant of the paper, each cluster takes the
``ceil(N / k)`` queries and the ``ceil(N / k)`` keys nearest to its centroid and attends within them; a
query chosen by several clusters combines them into one softmax, a query chosen by none gets zeros (the
paper mixes routing heads with local heads for that reason).

``clustered``: the queries are grouped into ``num_clusters`` clusters by k-means (Lloyd iterations) on their
LSH codes (``bits`` random hyperplanes, Hamming distance; ``bits=None`` clusters the queries themselves);
each cluster's centroid (the mean of its queries) attends to all keys and every query takes its cluster's
output. O(N·C) instead of O(N²).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_float, check_int
from ..ops._dispatch import upcast
from ..registry import register
from ._base import TokenMixer, softmax_attention
from ._sparse_utils import (
    SeededMixin,
    attention_lse,
    gather_rows,
    hash_normal,
    key_mask_of,
)

__all__ = ['RoutingAttention', 'ClusteredAttention', 'routing_inputs']


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
    year=2020, family='clustering', complexity='O(N²/k)', kind='mixer',
)
class RoutingAttention(TokenMixer):
    """Routing attention: each online k-means cluster attends among its nearest queries and keys.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`).
        num_clusters: k, the centroids per head (the paper: about sqrt(N)).
        decay: EMA decay of the online k-means update (the paper: 0.999).
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask``: [B, N] bool key padding (True = real token).
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
            num_clusters: int = 16,
            decay: float = 0.999,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        self.num_clusters = check_int('num_clusters', num_clusters)
        self.decay = check_float('decay', decay, 0., 1., high_open=True)
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
        return self.merge_heads(self.routed_attention(q, k, v, kpm, qr, kr))

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        return self.routed_attention(q, k, v, key_padding_mask, q, k)

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

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        key_mask = key_mask_of(key_padding_mask, q)
        assign = self.cluster(q, key_mask)
        C = min(self.num_clusters, q.shape[-2])
        centroids, counts = cluster_means(q, assign, C, key_mask)  # [B, H, C, D]
        if key_padding_mask is not None:  # a cluster of padding only: the plain mean of its (padded) queries
            centroids = torch.where((counts > 0).unsqueeze(-1), centroids, cluster_means(q, assign, C)[0])
        out = softmax_attention(centroids, k, v, key_padding_mask=key_padding_mask,
                                dropout_p=self.attn_drop.p if self.training else 0., scale=self.scale)
        return gather_rows(out, assign)
