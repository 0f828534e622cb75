"""Causal ``routing`` (Routing Transformer, 2003.05997) and ``i_clustered`` (improved clustered attention,
2007.04825) against float64 references written from the papers' equations: outputs and every gradient, with key
padding, N=37. (Non-causal routing and clustered attention: tests/mixers/test_mixers_sparse.py.)

Routing, causal: a token goes to the centroid nearest to its unit query, and a query attends to the w = ceil(N/k)
most recent real tokens of its cluster (itself included), built here as a dense N x N pattern; one cluster is full
causal attention. i_clustered: per cluster, the top-k keys of the centroid's attention attended exactly with the
centroid's mass m̂ on them, the rest from the centroid's weights (the paper's eq. for A^t), a loop over clusters;
top-k = N is full softmax attention, and the error to full attention shrinks as top-k grows."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from _pattern_ref import assert_same_function, pattern_attention  # noqa: E402

B, C, H, N = 2, 24, 3, 37


def make(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(42)
    return visattn.create_mixer(name, C, num_heads=H, dtype=torch.float64, **kw).eval()


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(42)
    x = torch.randn(B, N, C, dtype=torch.float64)
    kpm = torch.rand(B, N) > 0.25
    kpm[:, 0] = True
    return x, kpm


def routing_pattern(m, q: torch.Tensor, kpm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, N, N] bool: same cluster (nearest centroid of the unit query; padding apart), key <= query, at most
    w - 1 same-cluster tokens between them, real key; and the cluster sizes [B, H, num_clusters + 1]."""
    w = -(-N // m.num_clusters)
    with torch.no_grad():
        cluster = torch.einsum('bhnd,hcd->bhnc', F.normalize(q, dim=-1), m.centroids).argmax(-1)
        cluster = cluster.masked_fill(~kpm[:, None], m.num_clusters)
        same = cluster[..., :, None] == cluster[..., None, :]
        i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
        rank = (same & (j < i)).sum(-1)  # earlier tokens of the own cluster
        recent = rank[..., :, None] - rank[..., None, :] < w
        sizes = F.one_hot(cluster, m.num_clusters + 1).sum(2)
        return same & (j <= i) & recent & kpm[:, None, None, :], sizes


@pytest.mark.parametrize('share_qk', [False, True])
def test_causal_routing_matches_the_within_cluster_causal_pattern(share_qk):
    m = make('routing', num_clusters=5, share_qk=share_qk)  # w = 8
    x, kpm = inputs()

    def reference(t):
        q, k, v = m.split_heads(t)
        allowed, _ = routing_pattern(m, q, kpm)
        s = q @ (q if share_qk else k).transpose(-1, -2) * m.scale
        e = torch.exp(s - s.amax(-1, keepdim=True)) * allowed
        return m.merge_heads(e / e.sum(-1, keepdim=True).clamp_min(1e-300) @ v)

    q, _, _ = m.split_heads(x)
    allowed, sizes = routing_pattern(m, q, kpm)
    assert (allowed.diagonal(dim1=-2, dim2=-1) | ~kpm[:, None]).all()  # a real query always sees itself
    assert (sizes[..., :-1] > 8).any()  # some cluster holds more than w real tokens: the look-back is truncated
    assert_same_function(m, x, reference, dict(attn_mask=kpm, is_causal=True))


def test_causal_routing_with_one_cluster_is_full_causal_attention():
    m = make('routing', num_clusters=1)
    x, kpm = inputs()
    causal = torch.ones(N, N, dtype=torch.bool).tril() & kpm[:, None, None, :]
    causal = causal & kpm[:, None, :, None]  # padded tokens are a cluster of their own: their rows see no real key
    assert_same_function(m, x, lambda t: pattern_attention(m, t, causal),
                         dict(attn_mask=kpm, is_causal=True))


def iclustered_ref(m, x, kpm):
    """Loop over the clusters: A^c = softmax(centroid Kᵀ), T = its top-k real keys, m̂ = Σ_T A^c; a member query i
    takes A^t_il = m̂ softmax_T(q_i Kᵀ)_l on T and A^c_l elsewhere."""
    q, k, v = m.split_heads(x)
    with torch.no_grad():
        assign = m.cluster(q, kpm[:, None].double())
    rows = []
    for b in range(B):
        heads = []
        for h in range(H):
            out = torch.zeros(N, v.shape[-1], dtype=v.dtype)
            real_keys = kpm[b].nonzero()[:, 0]
            for c in assign[b, h].unique():
                members = assign[b, h] == c
                real = members & kpm[b]
                centroid = q[b, h][real if real.any() else members].mean(0)
                a = torch.zeros(N, dtype=q.dtype)
                a[real_keys] = torch.softmax(k[b, h, real_keys] @ centroid * m.scale, 0)
                top = real_keys[a[real_keys].argsort(descending=True)[:m.topk]]
                in_top = torch.zeros(N, dtype=torch.bool)
                in_top[top] = True
                mass = a[top].sum()
                for i in members.nonzero()[:, 0]:
                    exact = torch.zeros(N, dtype=q.dtype)
                    exact[top] = mass * torch.softmax(k[b, h, top] @ q[b, h, i] * m.scale, 0)
                    out = out.index_put((i[None],), (torch.where(in_top, exact, a) @ v[b, h])[None])
            heads.append(out)
        rows.append(torch.stack(heads))
    return m.merge_heads(torch.stack(rows))


def test_i_clustered_matches_the_paper_equation():
    m = make('i_clustered', num_clusters=4, topk=5)
    x, kpm = inputs()
    assert_same_function(m, x, lambda t: iclustered_ref(m, t, kpm), dict(attn_mask=kpm))


def test_i_clustered_with_topk_n_is_full_attention_and_improves_on_clustered():
    x, kpm = inputs()
    full = make('full')
    ref = full(x, attn_mask=kpm)
    state = {k: v for k, v in full.state_dict().items()}
    errs = []
    for topk in (1, 8, N):
        m = make('i_clustered', num_clusters=4, bits=None, topk=topk, seed=0)
        m.load_state_dict({**m.state_dict(), **state})
        errs.append((m(x, attn_mask=kpm) - ref).abs().max().item())
    clustered = make('clustered', num_clusters=4, bits=None, seed=0)
    clustered.load_state_dict({**clustered.state_dict(), **state})
    assert errs[2] < 1e-10 and errs[0] > errs[1] > errs[2]
    assert (clustered(x, attn_mask=kpm) - ref).abs().max().item() > errs[1]
