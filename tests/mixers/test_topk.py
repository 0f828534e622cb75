"""``topk`` (Explicit Sparse Transformer 1912.11637; chunked, 2106.06899) against a float64 reference that sorts the
visible scores of every row and keeps the k largest, row by row; outputs and every gradient with padding and causal
masking; the chunked form equal to the plain one; ties; k >= N is full attention; which outputs a perturbed token
moves."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from _pattern_ref import assert_same_function, moved_rows, pattern_attention  # noqa: E402

B, C, H, N = 2, 24, 3, 37


def make(**kw) -> torch.nn.Module:
    torch.manual_seed(42)
    return visattn.create_mixer('topk', C, num_heads=H, dtype=torch.float64, **kw).eval()


def inputs(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(42)
    x = torch.randn(B, n, C, dtype=torch.float64)
    kpm = torch.rand(B, n) > 0.3
    kpm[1, 4:] = False  # the rows of batch 1 see at most 4 visible keys: fewer than k for some
    return x, kpm


def topk_pattern(m: torch.nn.Module, x: torch.Tensor, kpm: torch.Tensor, causal: bool) -> torch.Tensor:
    """Row by row: the k largest visible scores (all of them when fewer are visible)."""
    with torch.no_grad():
        q, k, _ = m.split_heads(x)
        s = q @ k.transpose(-1, -2)
    b_, h_, n, _ = s.shape
    allowed = torch.zeros(b_, h_, n, n, dtype=torch.bool)
    for b in range(b_):
        for i in range(n):
            visible = kpm[b] & ((torch.arange(n) <= i) | (not causal))
            for h in range(h_):
                ranked = torch.argsort(s[b, h, i].masked_fill(~visible, float('-inf')), descending=True)
                allowed[b, h, i, ranked[:min(m.top_k, int(visible.sum()))]] = True
    return allowed


@pytest.mark.parametrize('top_k,chunk_size,causal', [
    (5, None, False), (5, None, True), (5, 8, False), (5, 8, True), (1, 1, False), (12, 100, True)])
def test_matches_row_by_row_top_k(top_k, chunk_size, causal):
    m = make(top_k=top_k, chunk_size=chunk_size)
    x, kpm = inputs()
    allowed = topk_pattern(m, x, kpm, causal)
    assert_same_function(m, x, lambda t: pattern_attention(m, t, allowed), dict(attn_mask=kpm, is_causal=causal))


@pytest.mark.parametrize('chunk_size', [1, 5, 37, 64])
def test_chunked_equals_unchunked(chunk_size):
    plain, chunked = make(top_k=6), make(top_k=6, chunk_size=chunk_size)
    plain.qkv, plain.proj = chunked.qkv, chunked.proj  # the same parameters, so that their gradients compare
    x, kpm = inputs()
    assert_same_function(chunked, x, lambda t: plain(t, attn_mask=kpm, is_causal=True),
                         dict(attn_mask=kpm, is_causal=True))


def test_ties_at_the_kth_score():
    """Two equal keys tied at the k-th score: the plain form keeps both (k + 1 keys), the chunked form exactly k."""
    q = torch.ones(1, 1, 1, 2, dtype=torch.float64)
    k = torch.tensor([[3., 0.], [1., 0.], [1., 0.], [0., 0.]], dtype=torch.float64)[None, None]
    v = torch.eye(4, dtype=torch.float64)[None, None]
    plain, chunked = make(top_k=2), make(top_k=2, chunk_size=2)
    w_plain = plain.attend(q.expand(1, 1, 4, 2), k, v, None, None, False)[0, 0, 0]
    w_chunk = chunked.attend(q.expand(1, 1, 4, 2), k, v, None, None, False)[0, 0, 0]
    scores = torch.tensor([3., 1., 1.], dtype=torch.float64) * plain.scale
    torch.testing.assert_close(w_plain[:3], torch.softmax(scores, -1))
    assert w_plain[3] == 0
    assert (w_chunk > 0).sum() == 2 and w_chunk[3] == 0
    torch.testing.assert_close(w_chunk[w_chunk > 0], torch.softmax(scores[:2], -1))


def test_k_at_least_n_is_full_attention():
    m = make(top_k=N)
    x, kpm = inputs()
    q, k, v = m.split_heads(x)
    kpm[1] = True
    ref = m.merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=kpm[:, None, None, :]))
    torch.testing.assert_close(m(x, attn_mask=kpm), ref, rtol=1e-10, atol=1e-10)


def test_a_token_moves_the_rows_that_select_it():
    m = make(top_k=4)
    x, kpm = inputs()
    kpm[:] = True
    before = topk_pattern(m, x, kpm, False)
    for j in (0, 20):
        x2 = x.clone()
        torch.manual_seed(j)
        x2[:, j] = 10 * torch.randn_like(x2[:, j])
        after = topk_pattern(m, x2, kpm, False)
        expected = (before[..., j] | after[..., j]).any(1)
        expected[:, j] = True
        torch.manual_seed(j)
        assert torch.equal(moved_rows(m, x, j), expected)
