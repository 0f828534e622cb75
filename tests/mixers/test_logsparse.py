"""``logsparse`` (1907.00235) against a float64 reference: query i sees key j when ``d = i - j`` is 0 or a power of two
(the paper's ``I_l = {l - 2^⌊log2 l⌋, ..., l - 2, l - 1, l}``; with a local window w: ``d <= w`` or ``d - w`` a power
of two), ``j <= i`` when causal and ``|i - j|`` otherwise, built by loops; outputs and every gradient, padding, which
outputs a perturbed token moves, the O(log N) keys per query."""

import math
import sys
from pathlib import Path

import pytest
import torch

import visattn
from visattn.mixers.logsparse import logsparse_offsets

sys.path.insert(0, str(Path(__file__).parent))
from _pattern_ref import assert_same_function, moved_rows, pattern_attention, sees  # noqa: E402

B, C, H = 2, 24, 3


def make(**kw) -> torch.nn.Module:
    torch.manual_seed(42)
    return visattn.create_mixer('logsparse', C, num_heads=H, dtype=torch.float64, **kw).eval()


def log_pattern(n: int, window: int, causal: bool) -> torch.Tensor:
    def power_of_two(d: int) -> bool:
        return d > 0 and d & (d - 1) == 0

    allowed = torch.zeros(1, 1, n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            d = i - j if causal else abs(i - j)
            allowed[0, 0, i, j] = d >= 0 and (d <= window or power_of_two(d - window))
    return allowed


@pytest.mark.parametrize('n,window,causal', [
    (63, 0, True), (63, 0, False), (37, 3, True), (37, 5, False), (5, 9, True)])
def test_matches_dense_log_pattern(n, window, causal):
    m = make(local_window=window)
    torch.manual_seed(42)
    x = torch.randn(B, n, C, dtype=torch.float64)
    kpm = torch.rand(B, n) > 0.25
    allowed = log_pattern(n, window, causal) & kpm[:, None, None, :]
    assert_same_function(m, x, lambda t: pattern_attention(m, t, allowed), dict(attn_mask=kpm, is_causal=causal))


@pytest.mark.parametrize('causal', [False, True])
def test_a_token_moves_exactly_the_outputs_that_see_it(causal):
    m = make()
    torch.manual_seed(42)
    x = torch.randn(1, 40, C, dtype=torch.float64)
    allowed = log_pattern(40, 0, causal)
    for j in (0, 7, 39):
        assert torch.equal(moved_rows(m, x, j, dict(is_causal=causal)), sees(allowed, j))


def test_keys_per_query_grow_as_log_n():
    for n in (2, 100, 4096, 65537):
        assert len(logsparse_offsets(n)) == 1 + math.floor(math.log2(n - 1)) + 1
        assert len(logsparse_offsets(n, causal=False)) == 2 * len(logsparse_offsets(n)) - 1
    assert logsparse_offsets(20, local_window=3) == [0, -1, -2, -3, -4, -5, -7, -11, -19]
