"""``sinkhorn`` (Sparse Sinkhorn Attention, 2002.11296): SortCut and the causal form against float64 references
written from the paper's equations (outputs and every gradient, key padding, N=37 in blocks of 4 with a ragged
last block); SortCut over one block is full attention; the causal sorting matrix gathers only earlier blocks;
SortCut refuses a causal call. (Sinkhorn attention itself: tests/mixers/test_mixers_sparse.py.)"""

import sys
from pathlib import Path

import pytest
import torch

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from _pattern_ref import assert_same_function  # noqa: E402

B, C, H, N, BS = 2, 24, 3, 37, 4


def make(**kw) -> torch.nn.Module:
    torch.manual_seed(42)
    m = visattn.create_mixer('sinkhorn', C, num_heads=H, bucket_size=BS, dtype=torch.float64, **kw).eval()
    with torch.no_grad():
        m.sort_net.weight.mul_(4.)  # sharper sorting logits: the sorted blocks differ clearly from a uniform mix
    return m


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(42)
    x = torch.randn(B, N, C, dtype=torch.float64)
    kpm = torch.rand(B, N) > 0.25
    kpm[:, 0] = True
    kpm[1, 8:12] = False  # a whole block of padding
    return x, kpm


def blocks(t: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] -> [B, H, nb, b, D], zero-padded."""
    nb = -(-N // BS)
    out = t.new_zeros(t.shape[0], t.shape[1], nb * BS, t.shape[-1])
    out[:, :, :N] = t
    return out.unflatten(2, (nb, BS))


def sorted_blocks(m, q, k, v, kpm, causal):
    """The paper's ψ_S(K), ψ_S(V) [B, H, nb, b, D] and the real-token mass of each sorted key [B, H, nb, b]."""
    nb = -(-N // BS)
    real = torch.zeros(B, nb * BS, dtype=torch.float64)
    real[:, :N] = kpm.double()
    real = real.unflatten(1, (nb, BS))[:, None, :, :, None]  # [B, 1, nb, b, 1]
    qb, kb, vb = blocks(q), blocks(k), blocks(v)
    key_pool = (kb * real).sum(3)
    if causal:  # the gathering block i pools the real queries at positions <= i·b (a mean)
        qf, rf = (qb * real).flatten(2, 3), real.flatten(2, 3)
        query_pool = torch.stack([qf[:, :, :i * BS + 1].sum(2) / rf[:, :, :i * BS + 1].sum(2).clamp_min(1)
                                  for i in range(nb)], dim=2)
    else:
        query_pool = (qb * real).sum(3)
    logits = (query_pool @ m.sort_net.weight.T) @ key_pool.transpose(-1, -2) * m.scale / m.temperature
    if causal:
        earlier = torch.ones(nb, nb).tril(-1).bool()
        e = torch.exp(logits - logits.amax(-1, keepdim=True)) * earlier
        s = e / e.sum(-1, keepdim=True).clamp_min(1e-300)  # row 0: no earlier block, zeros
    else:
        s = torch.exp(logits)
        for _ in range(m.sinkhorn_iters):  # Sinkhorn balancing, in plain (not log) space
            s = s / s.sum(-1, keepdim=True)
            s = s / s.sum(-2, keepdim=True)
    ks = torch.einsum('bhij,bhjtd->bhitd', s, kb * real)
    vs = torch.einsum('bhij,bhjtd->bhitd', s, vb * real)
    return ks, vs, torch.einsum('bhij,bzjt->bhit', s, real[..., 0])


def softmax_rows(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    e = torch.exp(scores - scores.masked_fill(~allowed, -1e300).amax(-1, keepdim=True)) * allowed
    return e / e.sum(-1, keepdim=True).clamp_min(1e-300)


def sortcut_ref(m, x, kpm):
    """Y = softmax(Q ψ_S(K)[:n]ᵀ) ψ_S(V)[:n] (each sorted key weighted by the real tokens it holds)."""
    q, k, v = m.split_heads(x)
    ks, vs, mass = sorted_blocks(m, q, k, v, kpm, causal=False)
    n = m.sortcut_blocks
    ks, vs, mass = ks[:, :, :n].flatten(2, 3), vs[:, :, :n].flatten(2, 3), mass[:, :, :n].flatten(2)
    scores = q @ ks.transpose(-1, -2) * m.scale + torch.log(mass.clamp_min(1e-300))[:, :, None]
    return m.merge_heads(softmax_rows(scores, (mass > 0)[:, :, None].expand_as(scores)) @ vs)


def causal_ref(m, x, kpm):
    """Query t of block i: its sorted block (earlier blocks only) and the real keys of block i at positions <= t."""
    q, k, v = m.split_heads(x)
    ks, vs, mass = sorted_blocks(m, q, k, v, kpm, causal=True)
    blk = torch.arange(N) // BS
    pos = torch.arange(N)
    local = (blk[:, None] == blk[None, :]) & (pos[None, :] <= pos[:, None]) & kpm[:, None, None, :]  # [B, 1, N, N]
    s_local = q @ k.transpose(-1, -2) * m.scale
    ks_t, vs_t, mass_t = ks[:, :, blk], vs[:, :, blk], mass[:, :, blk]  # each query's sorted block [B, H, N, b, D]
    s_sorted = torch.einsum('bhnd,bhntd->bhnt', q, ks_t) * m.scale + torch.log(mass_t.clamp_min(1e-300))
    p = softmax_rows(torch.cat([s_sorted, s_local], -1),
                     torch.cat([mass_t > 0, local.expand(B, H, N, N)], -1))
    return m.merge_heads(torch.einsum('bhnt,bhntd->bhnd', p[..., :BS], vs_t) + p[..., BS:] @ v)


@pytest.mark.parametrize('n_cut', [1, 3])
def test_sortcut_matches_the_paper_equation(n_cut):
    m = make(sortcut_blocks=n_cut)
    x, kpm = inputs()
    assert_same_function(m, x, lambda t: sortcut_ref(m, t, kpm), dict(attn_mask=kpm))
    assert_same_function(m, x, lambda t: sortcut_ref(m, t, torch.ones_like(kpm)))


def test_sortcut_over_one_block_is_full_attention():
    m = visattn.create_mixer('sinkhorn', C, num_heads=H, bucket_size=N, sortcut_blocks=2, dtype=torch.float64)
    x, kpm = inputs()
    q, k, v = m.split_heads(x)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=kpm[:, None, None, :])
    torch.testing.assert_close(m(x, attn_mask=kpm), m.merge_heads(full), rtol=1e-10, atol=1e-10)


def test_causal_matches_the_paper_construction():
    m = make()
    x, kpm = inputs()
    assert_same_function(m, x, lambda t: causal_ref(m, t, kpm), dict(attn_mask=kpm, is_causal=True))
    assert_same_function(m, x, lambda t: causal_ref(m, t, torch.ones_like(kpm)), dict(is_causal=True))


def test_causal_sorting_gathers_earlier_blocks_only():
    m = make()
    x, _ = inputs()
    q, k, _ = m.split_heads(x)
    s = m.sorting_matrix(blocks(q), blocks(k), torch.ones(1, 1, 10, BS, dtype=torch.bool), causal=True)
    assert (s.triu() == 0).all()  # block i gathers blocks j < i only; block 0 nothing
    torch.testing.assert_close(s[:, :, 1:].sum(-1), torch.ones(B, H, 9, dtype=s.dtype), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(s[:, :, 5, :5], torch.full_like(s[:, :, 5, :5], 0.2))  # a sort, not a mean


def test_sortcut_refuses_a_causal_call():
    m = make(sortcut_blocks=2)
    with pytest.raises(ValueError, match='sortcut_blocks'):
        m(inputs()[0], is_causal=True)
