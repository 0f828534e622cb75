"""``blockwise`` (BlockBERT, 1911.02972) against a float64 reference: for head h, query block c attends to key block
``(c + shift_h) mod n`` only, as the paper's masking matrix ``M_cj = [π(c) = j]``, built by loops; outputs and every
gradient with padding, causal masking, a last partial block, fixed block counts and fixed block sizes; the paper's
head assignment; which outputs a perturbed token moves; errors."""

import sys
from pathlib import Path

import pytest
import torch

import visattn
from visattn.mixers.blockwise import default_shifts

sys.path.insert(0, str(Path(__file__).parent))
from _pattern_ref import assert_same_function, moved_rows, pattern_attention, sees  # noqa: E402

B, C, H = 2, 24, 3


def make(**kw) -> torch.nn.Module:
    torch.manual_seed(42)
    return visattn.create_mixer('blockwise', C, num_heads=H, dtype=torch.float64, **kw).eval()


def inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(42)
    x = torch.randn(B, n, C, dtype=torch.float64)
    kpm = torch.rand(B, n) > 0.3
    kpm[1, 30:] = False
    return x, kpm


def permutation_pattern(n: int, b: int, shifts: list[int], causal: bool) -> torch.Tensor:
    nb = -(-n // b)
    allowed = torch.zeros(1, len(shifts), n, n, dtype=torch.bool)
    for h, s in enumerate(shifts):
        for i in range(n):
            for j in range(n):
                allowed[0, h, i, j] = j // b == (i // b + s) % nb and (j <= i or not causal)
    return allowed


@pytest.mark.parametrize('kw,b,shifts,causal', [
    (dict(num_blocks=3), 13, [0, 1, 2], False),  # default shifts for 3 heads and 3 blocks: one head each
    (dict(num_blocks=3), 13, [0, 1, 2], True),
    (dict(num_blocks=2, shifts=[1, 0, 1]), 19, [1, 0, 1], False),
    (dict(block_size=5, shifts=[0, 2, -1]), 5, [0, 2, -1], False),  # 8 blocks, the last of 2 tokens
    (dict(block_size=5, shifts=[3, 0, 1]), 5, [3, 0, 1], True),
    (dict(block_size=6), 6, [0, 0, 1], False),  # block_size: the default shifts of n = 2
])
def test_matches_dense_permutation_pattern(kw, b, shifts, causal):
    m = make(**kw)
    assert m.shifts == shifts and m.block_size_for(37) == b
    x, kpm = inputs(37)
    allowed = permutation_pattern(37, b, shifts, causal) & kpm[:, None, None, :]
    assert_same_function(m, x, lambda t: pattern_attention(m, t, allowed), dict(attn_mask=kpm, is_causal=causal))


@pytest.mark.parametrize('causal', [False, True])
def test_unpadded_whole_blocks(causal):
    """No padding and N a multiple of b: the shifted blocks go to one SDPA call when nothing is masked."""
    m = make(block_size=4, shifts=[0, 1, 3])
    x, _ = inputs(36)
    allowed = permutation_pattern(36, 4, [0, 1, 3], causal)
    assert_same_function(m, x, lambda t: pattern_attention(m, t, allowed), dict(is_causal=causal))


def test_a_token_moves_exactly_the_outputs_that_see_its_block():
    m = make(block_size=4, shifts=[0, 1, 3])
    x = inputs(37)[0][:1]
    allowed = permutation_pattern(37, 4, [0, 1, 3], False)
    for j in (0, 9, 36):
        assert torch.equal(moved_rows(m, x, j), sees(allowed, j))


def test_one_block_is_full_attention():
    m = make(num_blocks=1)
    x, kpm = inputs(37)
    assert_same_function(m, x, lambda t: pattern_attention(m, t, kpm[:, None, None, :]), dict(attn_mask=kpm))


def test_paper_head_assignment():
    assert default_shifts(12, 2) == [0] * 10 + [1] * 2  # 10:2
    assert default_shifts(12, 3) == [0] * 8 + [1, 1, 2, 2]  # 8:2:2
    assert default_shifts(2, 3) == [0, 1] and default_shifts(1, 2) == [0] and default_shifts(4, 2) == [0, 0, 0, 1]
    assert visattn.create_mixer('blockwise', 24, num_heads=12).shifts == [0] * 10 + [1] * 2


def test_errors():
    with pytest.raises(ValueError, match='num_blocks or block_size'):
        make(num_blocks=2, block_size=8)
    with pytest.raises(ValueError, match='one shift per head'):
        make(shifts=[0, 1])
    with pytest.raises(TypeError, match='shifts'):
        make(shifts=[0, 1, 1.5])
