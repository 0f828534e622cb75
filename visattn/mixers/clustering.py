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

from ..registry import register
from ._base import TokenMixer, softmax_attention
from ._sparse_utils import (
    EMPTY_LSE,
    SeededMixin,
    active_dropout,
    attention_lse,
    check_int,
    gather_rows,
    key_mask_of,
    seeded_generator,
)

__all__ = ['RoutingAttention', 'ClusteredAttention']


def kmeans_assign(x: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid (Euclidean): ``x [..., N, D]``, ``centroids [..., C, D]`` -> ``[..., N]``.

    ``argmax_c (x·c - |c|²/2)``, the scores written once (one batched ``baddbmm``).
    """
    lead = torch.broadcast_shapes(x.shape[:-2], centroids.shape[:-2])
    xs = x.expand(*lead, *x.shape[-2:]).reshape(-1, *x.shape[-2:])
    cs = centroids.expand(*lead, *centroids.shape[-2:]).reshape(-1, *centroids.shape[-2:])
    score = torch.baddbmm(-0.5 * cs.pow(2).sum(-1).unsqueeze(-2), xs, cs.transpose(-1, -2))
    return score.argmax(dim=-1).reshape(*lead, x.shape[-2])


def cluster_means(x: Tensor, assign: Tensor, num_clusters: int, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Means of ``x [..., N, D]`` per cluster (``assign [..., N]``); returns ``(means [..., C, D], counts [..., C])``.

    ``weight [..., N]`` (0 or 1, broadcastable) leaves tokens out; an empty cluster has a zero mean and count 0.
    Memory O(N·D + C·D): no one-hot matrix.
    """
    w = torch.ones_like(assign, dtype=x.dtype) if weight is None else weight.to(x.dtype).expand(assign.shape)
    sums = x.new_zeros(*x.shape[:-2], num_clusters, x.shape[-1]).scatter_add(
        -2, assign.unsqueeze(-1).expand_as(x), x * w.unsqueeze(-1))
    counts = w.new_zeros(*assign.shape[:-1], num_clusters).scatter_add(-1, assign, w)
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
        self.num_clusters = check_int(num_clusters, 'num_clusters')
        if not 0 <= decay < 1:
            raise ValueError(f'decay must be in [0, 1), got {decay}')
        self.decay = float(decay)
        self.register_buffer('centroids', torch.empty(num_heads, num_clusters, self.head_dim, device=device,
                                                      dtype=dtype))
        self.reset_centroids()

    def reset_centroids(self) -> None:
        """Random unit centroids."""
        if self.centroids.device.type != 'meta':
            with torch.no_grad():
                self.centroids.copy_(F.normalize(torch.randn(self.centroids.shape), dim=-1))

    @torch.no_grad()
    def update_centroids(self, qn: Tensor, kn: Tensor, weight: Tensor) -> None:
        """One online k-means step: move each centroid toward the mean of the unit q and k routed to it."""
        x = torch.cat([qn, kn], dim=-2).transpose(0, 1).flatten(1, 2).float()  # [H, B·2N, D]
        w = torch.cat([weight, weight], dim=-1).expand(qn.shape[0], qn.shape[1], -1).transpose(0, 1).flatten(1)
        means, counts = cluster_means(x, kmeans_assign(x, self.centroids.float()), self.num_clusters, w)
        new = self.decay * self.centroids.float() + (1 - self.decay) * means
        keep = (counts > 0).unsqueeze(-1)
        self.centroids.copy_(torch.where(keep, F.normalize(new, dim=-1), self.centroids.float()))

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        B, H, N, D = q.shape
        kc = self.num_clusters
        w = min(N, -(-N // kc))
        key_mask = key_mask_of(key_padding_mask, q)  # [B, 1, N]
        qn, kn = F.normalize(q.detach(), dim=-1), F.normalize(k.detach(), dim=-1)
        mu = self.centroids.to(q.dtype)
        # padded tokens rank last (similarities are in [-1, 1]), so they never take the place of a real one
        pad = ~key_mask.unsqueeze(-2)
        q_idx = torch.einsum('bhnd,hcd->bhcn', qn, mu).float().masked_fill(pad, -2.).topk(w, dim=-1).indices
        k_idx = torch.einsum('bhnd,hcd->bhcn', kn, mu).float().masked_fill(pad, -2.).topk(w, dim=-1).indices
        qs = gather_rows(q.unsqueeze(2), q_idx)  # [B, H, k, w, D]
        ks, vs = gather_rows(k.unsqueeze(2), k_idx), gather_rows(v.unsqueeze(2), k_idx)
        mask = torch.gather(key_mask.unsqueeze(2).expand(B, H, kc, N), -1, k_idx).unsqueeze(-2)
        drop = active_dropout(self.attn_drop)
        out, lse = attention_lse(qs, ks, vs, mask, scale=self.scale, drop=drop)
        if self.training:
            self.update_centroids(qn, kn, key_mask.to(qn.dtype))
        # a query chosen by several clusters: one softmax over the union of their keys
        flat_idx, flat_lse = q_idx.flatten(2), lse.flatten(2)  # [B, H, k·w]
        top = torch.full((B, H, N), EMPTY_LSE, dtype=lse.dtype, device=q.device)
        top = top.scatter_reduce(-1, flat_idx, flat_lse, reduce='amax').detach()
        wts = torch.exp(flat_lse - torch.gather(top, -1, flat_idx)) * (flat_lse > EMPTY_LSE)
        num = torch.zeros(B, H, N, D, dtype=out.dtype, device=q.device).index_put(
            (torch.arange(B, device=q.device)[:, None, None], torch.arange(H, device=q.device)[None, :, None],
             flat_idx), out.flatten(2, 3) * wts.unsqueeze(-1).to(out.dtype), accumulate=True)
        den = torch.zeros(B, H, N, dtype=wts.dtype, device=q.device).scatter_add(-1, flat_idx, wts)
        return num / torch.where(den > 0, den, torch.ones_like(den)).unsqueeze(-1).to(num.dtype)


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
        self.num_clusters = check_int(num_clusters, 'num_clusters')
        self.iterations = check_int(iterations, 'iterations', 0)
        self.bits = None if bits is None else check_int(bits, 'bits')
        self.init_seed(seed)

    @torch.no_grad()
    def cluster(self, q: Tensor, weight: Tensor) -> Tensor:
        """k-means cluster ids ``[B, H, N]`` of the queries ``q [B, H, N, D]`` (``weight [B, 1, N]``: 0 = padding)."""
        N, D = q.shape[-2:]
        C = min(self.num_clusters, N)
        x = q.float()
        if self.bits is not None:
            planes = torch.randn(D, self.bits, generator=seeded_generator(self.seed)).to(q.device)
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
