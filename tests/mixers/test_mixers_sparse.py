"""Sparse, hashing, clustering, sorting and compressed token mixers against plain float64 references.

The references are written here from the papers' equations: a dense softmax over the pattern's boolean mask
(local, longformer, bigbird, sparse_*, star, memory_compressed), and for the approximations (reformer,
sinkhorn, routing, clustered, probsparse) the budget at which they become exact softmax attention.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import visattn
from visattn.mixers._sparse_utils import attention_lse, merge_lse, window_attention_lse

B, N, C, H = 2, 37, 24, 3
MINE = ['bigbird', 'clustered', 'local', 'longformer', 'memory_compressed', 'probsparse', 'reformer', 'routing',
        'sinkhorn', 'sparse_fixed', 'sparse_strided', 'star']


def make(name: str, **kw) -> torch.nn.Module:
    return visattn.create_mixer(name, C, num_heads=H, **kw).double().eval()


def inputs(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(B, n, C, dtype=torch.float64)
    kpm = torch.rand(B, n) > 0.25
    kpm[:, 0] = True
    return x, kpm


def softmax_ref(q, k, v, mask, scale):
    """Plain masked softmax attention; a row with no visible key gives zeros."""
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float('-inf'))
    p = torch.softmax(s, dim=-1).nan_to_num(0.)
    return p @ v


def dense_ref(m, x, mask, k=None, v=None):
    q, k0, v0 = m.split_heads(x)
    out = softmax_ref(q, k0 if k is None else k, v0 if v is None else v, mask, m.scale)
    return m.merge_heads(out)


def rel():
    i = torch.arange(N)[:, None]
    j = torch.arange(N)[None, :]
    return i, j


@pytest.mark.parametrize('window,dilation,causal,padded', [
    (5, 1, False, True), (7, 2, False, False), (5, 3, True, True), (9, 1, True, False), (3, 5, False, True)])
def test_local_matches_dense_mask(window, dilation, causal, padded):
    m = make('local', window=window, dilation=dilation)
    x, kpm = inputs()
    i, j = rel()
    r = j - i
    lo, hi = (-(window - 1) * dilation, 0) if causal else (-(window // 2) * dilation, (window // 2) * dilation)
    mask = (r >= lo) & (r <= hi) & (r % dilation == 0)
    if padded:
        mask = mask & kpm[:, None, None, :]
    out = m(x, kpm if padded else None, is_causal=causal)
    torch.testing.assert_close(out, dense_ref(m, x, mask), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('global_proj,causal', [(False, False), (True, False), (True, True)])
def test_longformer_matches_dense_mask(global_proj, causal):
    m = make('longformer', window=5, dilation=2, global_tokens=(0, -3, 7), global_proj=global_proj)
    if global_proj:
        torch.testing.assert_close(m.qkv_global.weight, m.qkv.weight)  # the paper: Qg, Kg, Vg start as Qs, Ks, Vs
        with torch.no_grad():
            m.qkv_global.weight.add_(torch.randn_like(m.qkv_global.weight))
    x, kpm = inputs()
    i, j = rel()
    g = torch.zeros(N, dtype=torch.bool)
    g[[0, N - 3, 7]] = True
    r = j - i
    window = (r >= -8) & (r <= 0) if causal else r.abs() <= 4
    mask = ((window & (r % 2 == 0)) | g[None, :] | g[:, None]) & kpm[:, None, None, :]
    if causal:
        mask = mask & (j <= i)
    ref = dense_ref(m, x, mask)
    if global_proj:  # the rows of the global tokens: their own projections, over every real key
        qg, kg, vg = m.qkv_global(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        rows = softmax_ref(qg, kg, vg, kpm[:, None, None, :] & ((j <= i) if causal else True), m.scale)
        q, k, v = m.split_heads(x)
        heads = softmax_ref(q, k, v, mask, m.scale)
        heads[:, :, g] = rows[:, :, g]
        ref = m.merge_heads(heads)
    torch.testing.assert_close(m(x, kpm, is_causal=causal), ref, rtol=1e-10, atol=1e-10)


def test_longformer_rejects_out_of_range_global_token():
    m = make('longformer', window=3, global_tokens=(0, 40))
    with pytest.raises(ValueError, match='global_tokens'):
        m(inputs()[0])


@pytest.mark.parametrize('n', [37, 64])
def test_bigbird_matches_its_block_layout(n):
    b = 4
    m = make('bigbird', block_size=b, num_random_blocks=2, seed=3)
    x, kpm = inputs(n)
    nb = -(-n // b)
    key_blocks, valid, glob = m.block_layout(nb)
    allowed = torch.zeros(H, nb, nb, dtype=torch.bool)
    for h in range(H):
        for i in range(nb):
            allowed[h, i, key_blocks[h, i][valid[h, i]]] = True
    allowed[:, glob] = True
    # the paper's pattern: window blocks, global blocks both ways, random blocks
    ii = torch.arange(nb)
    assert ((ii[:, None] - ii[None, :]).abs() <= 1).logical_and(~allowed).sum() == 0
    assert allowed[:, :, glob].all()
    blocks = torch.arange(n) // b
    mask = allowed[:, blocks][:, :, blocks] & kpm[:, None, None, :]
    torch.testing.assert_close(m(x, kpm), dense_ref(m, x, mask), rtol=1e-10, atol=1e-10)


def test_bigbird_random_blocks_are_fresh_and_seeded():
    m = make('bigbird', block_size=4, num_random_blocks=3, seed=1)
    key_blocks, valid, glob = m.block_layout(12)
    rnd, ok = key_blocks[..., -3:], valid[..., -3:]
    i = torch.arange(12)[None, :, None]
    assert ok.any()
    assert not ((rnd - i).abs() <= 1)[ok].any()  # never a window block
    assert not torch.isin(rnd[ok], glob).any()  # never a global block
    again = make('bigbird', block_size=4, num_random_blocks=3, seed=1).block_layout(12)[0]
    other = make('bigbird', block_size=4, num_random_blocks=3, seed=2).block_layout(12)[0]
    assert torch.equal(again, key_blocks) and not torch.equal(other, key_blocks)


@pytest.mark.parametrize('causal', [False, True])
def test_sparse_strided_matches_dense_mask(causal):
    m = make('sparse_strided', stride=5)
    x, kpm = inputs()
    i, j = rel()
    mask = ((i - j).abs() < 5) | ((i - j) % 5 == 0)
    if causal:
        mask = mask & (j <= i)
    out = m(x, kpm, is_causal=causal)
    torch.testing.assert_close(out, dense_ref(m, x, mask & kpm[:, None, None, :]), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('causal', [False, True])
def test_sparse_fixed_matches_dense_mask(causal):
    m = make('sparse_fixed', stride=6, summary=2)
    x, kpm = inputs()
    i, j = rel()
    mask = (i // 6 == j // 6) | (j % 6 >= 4)
    if causal:
        mask = mask & (j <= i)
    out = m(x, kpm, is_causal=causal)
    torch.testing.assert_close(out, dense_ref(m, x, mask & kpm[:, None, None, :]), rtol=1e-10, atol=1e-10)


def test_sparse_strided_rejects_summary():
    with pytest.raises(ValueError, match='summary'):
        make('sparse_strided', summary=4)


def test_sparse_default_stride_is_sqrt_n():
    assert make('sparse_strided').stride_for(4096) == 64
    assert make('sparse_fixed').stride_for(37) == 7


def test_star_matches_ring_plus_relay():
    m = make('star')
    x, kpm = inputs()
    q, k, v = m.split_heads(x)
    w = kpm[..., None].double()
    relay = (x * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)  # s⁰ = mean of the real tokens
    _, ks, vs = m.split_heads(relay)
    i, j = rel()
    ring = ((i - j).abs() <= 1) & kpm[:, None, None, :]
    mask = torch.cat([ring.expand(B, 1, N, N), torch.ones(B, 1, N, 1, dtype=torch.bool)], dim=-1)
    ref = m.merge_heads(softmax_ref(q, torch.cat([k, ks], 2), torch.cat([v, vs], 2), mask, m.scale))
    torch.testing.assert_close(m(x, kpm), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('causal', [False, True])
def test_memory_compressed_matches_strided_conv_reference(causal):
    s = 3
    m = make('memory_compressed', compression=s)
    x, kpm = inputs()
    q, k, v = m.split_heads(x)

    def compress(t, conv):  # slot j = b + Σ_τ W[:, :, τ] t[s·j + τ] over the channels of all heads
        t = t.transpose(1, 2).reshape(B, N, C) * kpm[..., None]
        t = F.pad(t, (0, 0, 0, -N % s))
        slots = t.unflatten(1, (-1, s))  # [B, M, s, C]
        y = torch.einsum('bmtc,oct->bmo', slots, conv.weight) + conv.bias
        return y.reshape(B, -1, H, C // H).transpose(1, 2)

    kc, vc = compress(k, m.compress_k), compress(v, m.compress_v)
    M = kc.shape[2]
    slot_ok = F.pad(kpm, (0, -N % s)).unflatten(1, (M, s)).any(-1)[:, None, None, :]
    if causal:
        slot_ok = slot_ok & ((torch.arange(M) * s + s - 1)[None, :] <= torch.arange(N)[:, None])
    ref = m.merge_heads(softmax_ref(q, kc, vc, slot_ok, m.scale))
    torch.testing.assert_close(m(x, kpm, is_causal=causal), ref, rtol=1e-10, atol=1e-10)


def test_memory_compressed_with_identity_conv_is_full_attention():
    m = make('memory_compressed', compression=1)
    with torch.no_grad():
        for conv in (m.compress_k, m.compress_v):
            conv.weight.copy_(torch.eye(C)[:, :, None])
            conv.bias.zero_()
    x, kpm = inputs()
    torch.testing.assert_close(m(x, kpm), dense_ref(m, x, kpm[:, None, None, :]), rtol=1e-10, atol=1e-10)


def test_probsparse_with_u_equal_n_is_full_attention():
    m = make('probsparse', factor=N)
    x, kpm = inputs()
    torch.testing.assert_close(m(x, kpm), dense_ref(m, x, kpm[:, None, None, :]), rtol=1e-10, atol=1e-10)


def test_probsparse_rows_are_full_attention_or_mean_of_values():
    m = make('probsparse', factor=2)  # u = 2·ceil(ln 37) = 8 active queries
    x, kpm = inputs()
    q, k, v = m.split_heads(x)
    out = m.attend(q, k, v, kpm, None, False)
    full = softmax_ref(q, k, v, kpm[:, None, None, :], m.scale)
    w = kpm[:, None, :, None].double()
    lazy = (v * w).sum(2, keepdim=True) / w.sum(2, keepdim=True)
    active = (out - full).abs().amax(-1) < 1e-10
    assert (active.sum(-1) == 8).all()
    assert ((out - lazy).abs().amax(-1)[~active] < 1e-10).all()
    # the active queries are the top-u real queries by the sparsity measurement
    sparsity = m.sparsity(q, k, kpm[:, None]).masked_fill(~kpm[:, None], float('-inf'))
    assert torch.equal(active, torch.zeros_like(active).scatter(-1, sparsity.topk(8).indices, True))
    assert not active[~kpm[:, None].expand_as(active)].any()


def reformer_ref(m, x, kpm, causal):
    """Full shared-QK attention: keys = unit queries, self only when nothing else is visible."""
    q, _, v = m.split_heads(x)
    keys = F.normalize(q, dim=-1)
    s = ((q @ keys.transpose(-1, -2)) * m.scale).masked_fill(torch.eye(N, dtype=torch.bool), -5e4)
    i, j = rel()
    mask = kpm[:, None, None, :] & ((j <= i) if causal else torch.ones(N, N, dtype=torch.bool))
    p = torch.softmax(s.masked_fill(~mask, float('-inf')), -1).nan_to_num(0.)
    return m.merge_heads(p @ v)


@pytest.mark.parametrize('causal', [False, True])
def test_reformer_with_one_bucket_is_full_shared_qk_attention(causal):
    x, kpm = inputs()
    exact = make('reformer', n_buckets=1, bucket_size=N, n_hashes=2)
    ref = reformer_ref(exact, x, kpm, causal)
    # padded tokens hash to a bucket of their own: compare the real tokens
    torch.testing.assert_close(exact(x, kpm, is_causal=causal)[kpm], ref[kpm], rtol=1e-9, atol=1e-9)
    hashed = make('reformer', n_buckets=8, bucket_size=4, n_hashes=1)
    more = make('reformer', n_buckets=2, bucket_size=16, n_hashes=4)
    hashed.load_state_dict(exact.state_dict())
    more.load_state_dict(exact.state_dict())
    err = [(mm(x, kpm, is_causal=causal) - ref)[kpm].abs().mean().item() for mm in (hashed, more, exact)]
    assert err[0] > err[1] > err[2]


def test_reformer_causal_is_strictly_causal_with_hashing():
    m = make('reformer', n_buckets=4, bucket_size=4, n_hashes=2)
    x, _ = inputs()
    y = x.clone()
    y[:, 20:] = torch.randn_like(y[:, 20:])
    torch.testing.assert_close(m(x, is_causal=True)[:, :20], m(y, is_causal=True)[:, :20], rtol=0, atol=1e-12)
    assert not torch.allclose(m(x)[:, :20], m(y)[:, :20])


def test_reformer_attends_to_self_only_when_alone():
    m = make('reformer', n_buckets=1, bucket_size=N)
    x, _ = inputs()
    q, k, v = m.split_heads(x)
    out = m.attend(q, k, v, None, None, True)
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])  # the first token sees only itself


def test_sinkhorn_one_block_is_full_attention_and_sorting_is_doubly_stochastic():
    x, kpm = inputs()
    m = make('sinkhorn', bucket_size=N)
    torch.testing.assert_close(m(x, kpm), dense_ref(m, x, kpm[:, None, None, :]), rtol=1e-10, atol=1e-10)
    m = make('sinkhorn', bucket_size=4, sinkhorn_iters=30)
    q, k, _ = m.split_heads(x)
    blocks = (F.pad(t, (0, 0, 0, 3)).unflatten(2, (10, 4)) for t in (q, k))
    r = m.sorting_matrix(*blocks, torch.ones(1, 1, 10, 4, dtype=torch.bool))
    torch.testing.assert_close(r.sum(-1), torch.ones(B, H, 10, dtype=r.dtype), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r.sum(-2), torch.ones(B, H, 10, dtype=r.dtype), rtol=1e-4, atol=1e-4)


def test_sinkhorn_error_shrinks_as_blocks_grow():
    x, kpm = inputs()
    errs = []
    state = make('sinkhorn').state_dict()
    for b in (4, 16, N):
        m = make('sinkhorn', bucket_size=b)
        m.load_state_dict(state)
        errs.append((m(x, kpm) - dense_ref(m, x, kpm[:, None, None, :])).abs().mean().item())
    assert errs[0] > errs[2] and errs[1] > errs[2] and errs[2] < 1e-10


def test_routing_one_cluster_is_full_attention_and_centroids_learn_online():
    x, kpm = inputs()
    m = make('routing', num_clusters=1)
    torch.testing.assert_close(m(x, kpm), dense_ref(m, x, kpm[:, None, None, :]), rtol=1e-10, atol=1e-10)
    m = make('routing', num_clusters=4, decay=0.5)
    before = m.centroids.clone()
    m(x)
    assert torch.equal(before, m.centroids)  # eval: no update
    m.train()(x)
    assert not torch.allclose(before, m.centroids)
    torch.testing.assert_close(m.centroids.norm(dim=-1), torch.ones(H, 4, dtype=torch.float64))


def test_routing_output_is_a_softmax_over_its_clusters_keys():
    m = make('routing', num_clusters=3)
    x, _ = inputs()
    q, k, v = m.split_heads(x)
    out = m.attend(q, k, v, None, None, False)
    # each routed query's output is a convex combination of values: no row exceeds the value range
    assert (out <= v.amax(2, keepdim=True) + 1e-9).all() and (out >= v.amin(2, keepdim=True) - 1e-9).all()


def test_clustered_one_cluster_per_query_is_exact_and_one_cluster_is_shared():
    x, kpm = inputs()
    m = make('clustered', num_clusters=N, bits=None)
    torch.testing.assert_close(m(x)[kpm], dense_ref(m, x, torch.ones(N, N, dtype=torch.bool))[kpm], rtol=1e-10,
                               atol=1e-10)
    # padded queries do not join the clusters: with as many clusters as real queries, the real rows are exact
    m.num_clusters = int(kpm[0].sum())
    ref = dense_ref(m, x, kpm[:, None, None, :])
    torch.testing.assert_close(m(x[:1], kpm[:1])[kpm[:1]], ref[:1][kpm[:1]], rtol=1e-10, atol=1e-10)
    m = make('clustered', num_clusters=1)
    q, k, v = m.split_heads(x)
    out = m.attend(q, k, v, kpm, None, False)
    centroid = (q * kpm[:, None, :, None]).sum(2, keepdim=True) / kpm.sum(-1)[:, None, None, None]
    ref = softmax_ref(centroid, k, v, kpm[:, None, None, :], m.scale).expand_as(out)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_clustered_hashed_error_shrinks_with_clusters():
    x, _ = inputs()
    errs = []
    state = make('clustered').state_dict()
    for c in (2, 12, N):
        m = make('clustered', num_clusters=c, bits=None)
        m.load_state_dict(state)
        errs.append((m(x) - dense_ref(m, x, torch.ones(N, N, dtype=torch.bool))).abs().mean().item())
    assert errs[0] > errs[1] > errs[2]
    assert make('clustered', num_clusters=8, bits=16)(x).isfinite().all()


def test_window_lse_pieces_merge_into_one_softmax():
    q, k, v = (torch.randn(2, 3, 29, 5, dtype=torch.float64) for _ in range(3))
    i = torch.arange(29)
    loc = window_attention_lse(q, k, v, window=2, dilation=3)
    far = (i[None, :] - i[:, None]).abs() > 6
    glob = attention_lse(q, k, v, far | ((i[None, :] - i[:, None]) % 3 != 0), scale=5 ** -0.5)
    torch.testing.assert_close(merge_lse([loc, glob]), softmax_ref(q, k, v, torch.ones(29, 29, dtype=torch.bool),
                                                                   5 ** -0.5))


@pytest.mark.parametrize('name', MINE)
def test_fully_masked_rows_are_zero_and_gradients_finite(name):
    kw = {'num_clusters': 4} if name in ('routing', 'clustered') else {}
    m = make(name, **kw)
    x, kpm = inputs()
    kpm[1] = False
    x.requires_grad_(True)
    q, k, v = m.split_heads(x)
    if name in ('longformer', 'star'):
        out = m(x, kpm)
    else:
        out = m.attend(q, k, v, kpm, None, False)
        assert (out[1] == 0).all()
    out.square().sum().backward()
    assert x.grad.isfinite().all() and out.isfinite().all()


@pytest.mark.parametrize('name', ['local', 'longformer', 'sparse_fixed', 'reformer'])
def test_gradcheck(name):
    kw = dict(local={'window': 3}, longformer={'window': 3, 'global_tokens': (2,)}, sparse_fixed={'stride': 3},
              reformer={'n_buckets': 2, 'bucket_size': 3}).get(name, {})
    m = visattn.create_mixer(name, 4, num_heads=2, **kw).double().eval()
    x = torch.randn(1, 6, 4, dtype=torch.float64, requires_grad=True)
    kpm = torch.tensor([[True] * 5 + [False]])
    assert torch.autograd.gradcheck(lambda t: m(t, kpm), (x,))


@pytest.mark.parametrize('name,kw,match', [
    ('local', {'window': 4}, 'window'), ('longformer', {'window': 0}, 'window'),
    ('bigbird', {'num_window_blocks': 2}, 'num_window_blocks'), ('reformer', {'n_buckets': 3}, 'n_buckets'),
    ('sinkhorn', {'temperature': 0.}, 'temperature'), ('routing', {'decay': 1.0}, 'decay'),
    ('memory_compressed', {'groups': 5}, 'groups'), ('sparse_strided', {'stride': 0}, 'stride'),
    ('clustered', {'num_clusters': 0}, 'num_clusters'), ('probsparse', {'factor': 0}, 'factor'),
    ('sparse_fixed', {'summary': 0}, 'summary'),
])
def test_bad_arguments_raise(name, kw, match):
    with pytest.raises(ValueError, match=match):
        visattn.create_mixer(name, C, num_heads=H, **kw)
    if match not in ('temperature', 'decay'):
        with pytest.raises(TypeError, match=match):
            visattn.create_mixer(name, C, num_heads=H, **{match: 2.5})


@pytest.mark.parametrize('name', MINE)
def test_registry_flags_match_behaviour(name):
    m = make(name)
    x = torch.randn(1, 9, C, dtype=torch.float64)
    if visattn.info(name).supports_causal:
        assert name in visattn.list_mixers(causal=True)
        m(x, is_causal=True)
    else:
        with pytest.raises(ValueError, match='is_causal'):
            m(x, is_causal=True)
    with pytest.raises(ValueError, match='attn_mask'):
        m(x, attn_mask=torch.zeros(1, 1, 9, 9))


class _LargestTensor(TorchDispatchMode):
    """Records the largest storage (in elements) that any op creates."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


@pytest.mark.parametrize('name', [n for n in MINE if n != 'memory_compressed'])
def test_no_n_by_n_intermediate(name):
    n = 2048
    kw = {'local': {'window': 9}, 'longformer': {'window': 9}, 'bigbird': {'block_size': 16},
          'reformer': {'bucket_size': 16}, 'sinkhorn': {'bucket_size': 16}}.get(name, {})
    m = visattn.create_mixer(name, 8, num_heads=1, **kw).eval()
    x = torch.randn(1, n, 8)
    with torch.inference_mode(), _LargestTensor() as probe:
        m(x, is_causal=visattn.info(name).supports_causal)
    assert probe.largest < n * n // 4


def test_longformer_global_projections_start_from_timm_qkv():
    src = visattn.create_mixer('full', C, num_heads=H)
    m = visattn.create_mixer('longformer', C, num_heads=H, window=3)
    result = m.load_state_dict(src.state_dict(), strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(m.qkv_global.weight, src.qkv.weight) and torch.equal(m.qkv.weight, src.qkv.weight)


@pytest.mark.parametrize('name', ['bigbird', 'reformer', 'probsparse', 'clustered'])
def test_seed_differs_per_layer_and_travels_with_the_state_dict(name):
    kw = {'bigbird': {'block_size': 4}, 'reformer': {'bucket_size': 4}, 'probsparse': {'factor': 1},
          'clustered': {'num_clusters': 4}}[name]
    a, b = make(name, **kw), make(name, **kw)
    assert a.seed != b.seed
    x, _ = inputs()
    weights = {k: v for k, v in a.state_dict().items() if not k.endswith('_extra_state')}
    b.load_state_dict(weights, strict=False)
    assert not torch.allclose(b(x), a(x))  # the same weights, another random pattern
    b.load_state_dict(a.state_dict())
    assert b.seed == a.seed
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
