"""``block_local`` (non-overlapping blocks, 1801.10198 / 2112.07210) against a float64 reference: a dense softmax over
the pattern ``i // b == j // b`` (and ``j <= i`` when causal) built by loops; outputs and every gradient, with and
without padding, a last partial block, the SDPA fast path; which outputs a perturbed token moves."""

import sys
from pathlib import Path

import pytest
import torch

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from _pattern_ref import assert_same_function, moved_rows, pattern_attention, sees  # noqa: E402

B, C, H = 2, 24, 3


def make(**kw) -> torch.nn.Module:
    torch.manual_seed(42)
    return visattn.create_mixer('block_local', C, num_heads=H, dtype=torch.float64, **kw).eval()


def inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(42)
    x = torch.randn(B, n, C, dtype=torch.float64)
    kpm = torch.rand(B, n) > 0.3
    kpm[1, :6] = False  # a whole block of keys hidden: its queries see nothing and give zeros
    return x, kpm


def blocks_pattern(n: int, b: int, causal: bool, kpm: torch.Tensor | None) -> torch.Tensor:
    allowed = torch.zeros(B, 1, n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            allowed[:, 0, i, j] = i // b == j // b and (j <= i or not causal)
    return allowed if kpm is None else allowed & kpm[:, None, None, :]


@pytest.mark.parametrize('n,b,causal,padded', [
    (37, 5, False, True), (37, 8, True, True), (36, 4, False, False), (36, 4, True, False), (37, 6, True, False),
    (37, 64, False, True)])
def test_matches_dense_block_pattern(n, b, causal, padded):
    m = make(block_size=b)
    x, kpm = inputs(n)
    allowed = blocks_pattern(n, b, causal, kpm if padded else None)
    assert_same_function(m, x, lambda t: pattern_attention(m, t, allowed),
                         dict(attn_mask=kpm if padded else None, is_causal=causal))


@pytest.mark.parametrize('causal', [False, True])
def test_a_token_moves_exactly_the_outputs_of_its_block(causal):
    m = make(block_size=6)
    x, _ = inputs(37)
    allowed = blocks_pattern(37, 6, causal, None)
    for j in (0, 14, 36):  # the last block holds one token
        assert torch.equal(moved_rows(m, x, j, dict(is_causal=causal)), sees(allowed, j))


def test_one_block_is_full_attention():
    m = make(block_size=256)
    x, kpm = inputs(37)
    q, k, v = m.split_heads(x)
    ref = m.merge_heads(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=kpm[:, None, None, :]))
    torch.testing.assert_close(m(x, attn_mask=kpm), ref, rtol=1e-10, atol=1e-10)
