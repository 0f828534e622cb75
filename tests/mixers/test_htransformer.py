"""H-Transformer-1D against a dense float64 reference written from the paper's hierarchical matrix: every pair
(query i, key j) is assigned to its level (0: the same or the sibling leaf block; l: the sibling blocks of 2^l·Nr
tokens) and weighted ``exp(q̄·k̄)`` with q and k averaged over the 2^l tokens at that level; outputs and gradients,
padded, causal, fine or coarse queries; exactness once level 0 covers the matrix."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, build, out_proj, qkv  # noqa: E402

N, C, H = 37, 30, 2


def levels(n_pad: int, nr: int) -> torch.Tensor:
    """[L, L] int: the level of each (query, key) pair in the H-matrix with leaf blocks of ``nr``: the smallest l
    at which the blocks of ``nr·2^l`` tokens of i and j are the same or siblings."""
    i, j = torch.arange(n_pad)[:, None], torch.arange(n_pad)[None, :]
    lev = torch.full((n_pad, n_pad), -1)
    size, level = nr, 0
    while (lev < 0).any():
        near = (i // size == j // size) | ((i // size) ^ 1 == j // size)
        lev = torch.where((lev < 0) & near, level, lev)
        size, level = 2 * size, level + 1
    return lev


def coarse(t: torch.Tensor, real: torch.Tensor, group: int) -> torch.Tensor:
    """Each token replaced by the mean of the real tokens of its group of ``group`` tokens: [B, H, L, D]."""
    w = real[:, None, :, None].to(t.dtype)
    sums = (t * w).unflatten(2, (-1, group)).sum(3, keepdim=True)
    count = w.unflatten(2, (-1, group)).sum(3, keepdim=True).clamp_min(1)
    return (sums / count).expand(-1, -1, -1, group, -1).flatten(2, 3)


def reference(m, x, kpm=None, causal=False, fine_queries=False):
    q, k, v = qkv(m, x)
    B, _, n, _ = q.shape
    nr = m.block_size
    blocks = 1
    while blocks * nr < n:
        blocks *= 2
    L = blocks * nr
    pad = torch.nn.functional.pad
    q, k, v = (pad(t, (0, 0, 0, L - n)) for t in (q, k, v))
    real = torch.ones(B, n, dtype=torch.bool) if kpm is None else kpm
    real = pad(real, (0, L - n), value=False)
    lev = levels(L, nr)
    scores = torch.zeros(B, H, L, L, dtype=x.dtype)
    for level in range(int(lev.max()) + 1):
        g = 2 ** level
        qc = q if (level == 0 or fine_queries) else coarse(q, real, g)
        kc = k if level == 0 else coarse(k, real, g)
        scores = torch.where(lev == level, qc @ kc.transpose(-1, -2) * m.scale, scores)
    keep = real[:, None, None, :] & (torch.ones(L, L, dtype=torch.bool).tril() if causal else True)
    w = torch.exp(scores - scores.amax(-1, keepdim=True)) * keep
    out = (w @ v) / w.sum(-1, keepdim=True).clamp_min(1e-300)
    return out_proj(m, out[:, :, :n])


@pytest.mark.parametrize('block_size,causal,coarsen', [(4, False, True), (3, False, False), (2, True, True)])
def test_matches_the_hierarchical_matrix(block_size, causal, coarsen):
    m = build('htransformer', C, H, block_size=block_size, coarsen_queries=coarsen)
    x = torch.randn(2, N, C, dtype=torch.float64)
    kpm = torch.rand(2, N) > 0.3
    kpm[1, :9] = False  # whole leaf blocks of padding
    fine = causal or not coarsen
    assert_matches(m, x, lambda t: reference(m, t, causal=causal, fine_queries=fine), is_causal=causal)
    assert_matches(m, x, lambda t: reference(m, t, kpm, causal=causal, fine_queries=fine), attn_mask=kpm,
                   is_causal=causal)


def test_the_levels_partition_the_matrix_as_the_paper():
    lev = levels(16, 2)  # 8 leaf blocks: levels 0, 1, 2
    assert lev.max() == 2 and torch.equal(lev, lev.T)
    assert (lev[:2, :4] == 0).all() and (lev[:4, 4:8] == 1).all() and (lev[:8, 8:] == 2).all()
    assert (lev[2:4, 4:6] == 1).all()  # adjacent leaf blocks of different parents: coarse, not near field
    m = build('htransformer', C, H, block_size=5)
    assert [m.num_blocks(n) for n in (1, 5, 6, 11, 37, 40, 41)] == [1, 1, 2, 4, 8, 8, 16]


@pytest.mark.parametrize('causal', [False, True])
def test_exact_softmax_once_level_zero_covers_everything(causal):
    exact = build('full', C, H)
    x = torch.randn(2, N, C, dtype=torch.float64)
    for block_size in (19, 37, 64):  # 2 leaf blocks (19 + 19 >= 37) or one
        m = build('htransformer', C, H, block_size=block_size)
        m.load_state_dict(exact.state_dict())
        torch.testing.assert_close(m(x, is_causal=causal), exact(x, is_causal=causal), rtol=1e-10, atol=1e-10)
    m = build('htransformer', C, H, block_size=4)
    m.load_state_dict(exact.state_dict())
    coarse_err = (m(x) - exact(x)).abs().max()
    assert coarse_err > 1e-4  # below that, levels 1.. really approximate


def test_arguments():
    with pytest.raises(ValueError, match='block_size'):
        build('htransformer', C, H, block_size=0)
