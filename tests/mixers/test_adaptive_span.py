"""``adaptive_span`` (1905.07799) against a float64 reference written from the paper's equation,
``a_tr = m_z(t - r) exp(s_tr) / Σ_q m_z(t - q) exp(s_tq)`` with ``m_z(x) = clamp((R + z - x) / R, 0, 1)`` and
``z = S · clamp(ρ, 0, 1)`` per head, over the distances ``0 .. S - 1`` (``|t - r|`` when not causal): outputs and every
gradient, the span parameter's included, on the band path and on the full path, with padding; the cut of the band at
the widest span; which outputs a perturbed token moves; the span penalty."""

import sys
from pathlib import Path

import pytest
import torch

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from _pattern_ref import assert_same_function, moved_rows, pattern_attention  # noqa: E402

B, C, H, N = 2, 24, 3, 37


def make(ratios=(0.1, 0.35, 0.8), **kw) -> torch.nn.Module:
    torch.manual_seed(42)
    m = visattn.create_mixer('adaptive_span', C, num_heads=H, dtype=torch.float64, **kw).eval()
    with torch.no_grad():
        m.span_ratio.copy_(torch.tensor(ratios, dtype=torch.float64))
    return m


def paper_weights(m: torch.nn.Module, n: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(allowed [1, 1, n, n], m_z [1, H, n, n])`` from the paper's formula, with the distances entry by entry."""
    distance = torch.zeros(n, n, dtype=torch.float64)
    allowed = torch.zeros(1, 1, n, n, dtype=torch.bool)
    for t in range(n):
        for r in range(n):
            x = t - r if causal else abs(t - r)
            distance[t, r] = x
            allowed[0, 0, t, r] = 0 <= x <= m.max_span - 1
    z = m.max_span * m.span_ratio.clamp(0, 1)[:, None, None]
    return allowed, ((m.ramp + z - distance) / m.ramp).clamp(0, 1)[None]


@pytest.mark.parametrize('max_span,ramp,causal', [(12, 4, True), (12, 4, False), (64, 8, True), (64, 3, False)])
def test_matches_the_paper_formula(max_span, ramp, causal):
    m = make(max_span=max_span, ramp=ramp)
    torch.manual_seed(42)
    x = torch.randn(B, N, C, dtype=torch.float64)
    kpm = torch.rand(B, N) > 0.25

    def reference(t):
        allowed, weight = paper_weights(m, N, causal)
        return pattern_attention(m, t, allowed & kpm[:, None, None, :], weight)

    assert_same_function(m, x, reference, dict(attn_mask=kpm, is_causal=causal))


def test_span_gets_gradient_and_penalty():
    m = make(ratios=(0., 0.5, 0.9), max_span=16, ramp=4)
    torch.manual_seed(42)
    x = torch.randn(1, N, C, dtype=torch.float64)
    m(x).square().sum().backward()
    assert (m.span_ratio.grad != 0).all()  # at the lower end of [0, 1] too
    torch.testing.assert_close(m.spans(), torch.tensor([0., 8., 14.4], dtype=torch.float64))
    m.zero_grad()
    m.span_penalty().backward()
    torch.testing.assert_close(m.span_penalty().detach(), torch.tensor(22.4 / 3, dtype=torch.float64))
    torch.testing.assert_close(m.span_ratio.grad, torch.full((H,), 16 / 3, dtype=torch.float64))


def test_band_is_cut_at_the_widest_span():
    m = make(ratios=(0.1, 0.35, 0.2), max_span=40, ramp=4)  # z = 4, 14, 8: no key past 17
    assert m.reach() == 17
    torch.manual_seed(42)
    x = torch.randn(1, 60, C, dtype=torch.float64)
    allowed, weight = paper_weights(m, 60, False)
    for j in (0, 30):  # the outputs that move are those within R + z of j in some head
        expected = (weight[0, :, :, j] > 0).any(0)
        assert torch.equal(moved_rows(m, x, j)[0] | (torch.arange(60) == j), expected | (torch.arange(60) == j))
