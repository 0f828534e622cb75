"""Normalized attention pooling (``normalized``, 2005.09561): a float64 reference from the paper's equations (per
query, the visible keys' logits standardised with their own mean and population deviation, ε on the sum of squares,
then g·â + b) for outputs and every gradient, with masks and causality; the weights' statistics; invariance to the
scale of the logits; what a row with one or no visible key gives; the fixed (non-affine) form."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import build, out_proj, qkv  # noqa: E402
from _mask_ref import assert_matches_under_masks  # noqa: E402

F64 = torch.float64


def _reference(m: torch.nn.Module, x: torch.Tensor, visible: torch.Tensor | None = None,
               add: torch.Tensor | None = None) -> torch.Tensor:
    """Query by query: the logits of the visible keys (the others NaN), s' = (s - nanmean) /
    sqrt((Σ (s - nanmean)² + ε) / n), weights g_h s' + b_h on the visible keys and 0 elsewhere; then the values and
    ``proj``."""
    q, k, v = qkv(m, x)
    B, H, N, _ = q.shape
    vis = torch.ones(B, H, N, N, dtype=torch.bool) if visible is None else visible.expand(B, H, N, N)
    rows = []
    for i in range(N):
        s = (q[:, :, i, None, :] * k).sum(-1)  # [B, H, N]
        if add is not None:
            s = s + add[:, :, i]
        seen = vis[:, :, i]
        n = seen.sum(-1, keepdim=True)
        dev = torch.where(seen, s - torch.where(seen, s, torch.nan).nanmean(-1, keepdim=True).nan_to_num(0.), 0.)
        a = m.gain[:, None] * dev / torch.sqrt((dev.square().sum(-1, keepdim=True) + m.eps) / n.clamp_min(1))
        a = torch.where(seen, a + m.shift[:, None], 0.)
        rows.append((a[..., None] * v).sum(-2))
    return out_proj(m, torch.stack(rows, 2))


def test_matches_the_equations_with_masks_and_causality():
    m = build('normalized', 8, 2)  # gain and shift random too
    assert_matches_under_masks(m, torch.randn(2, 9, 8, dtype=F64), lambda t, **kw: _reference(m, t, **kw))


def test_weights_are_standardised_not_probabilities():
    m = visattn.create_mixer('normalized', 16, num_heads=2, dtype=F64).eval()  # g = 1, b = 0
    q, k, _ = m.split_heads(torch.randn(2, 23, 16, dtype=F64))
    keep = torch.rand(2, 23) > 0.3
    a = m.weights(q, k, keep, None, False)
    vis = keep[:, None, None, :].expand_as(a)
    n = vis.sum(-1)
    torch.testing.assert_close(a.sum(-1), torch.zeros_like(n, dtype=F64), rtol=0, atol=1e-10)
    torch.testing.assert_close(a.square().sum(-1) / n, torch.ones_like(n, dtype=F64), rtol=0, atol=1e-10)
    assert (a[~vis] == 0).all() and (a < 0).any()


def test_invariant_to_the_scale_of_the_logits():
    """No 1/sqrt(D) and no temperature: scaling the queries scales the logits, which the normalisation undoes."""
    m = build('normalized', 8, 2)
    x = torch.randn(2, 11, 8, dtype=F64)
    ref = m(x)
    with torch.no_grad():
        m.qkv.weight[:8] *= 7.
    torch.testing.assert_close(m(x), ref, rtol=1e-9, atol=1e-9)


def test_one_visible_key_gives_the_shift_and_none_gives_zeros():
    m = build('normalized', 8, 2)
    q, k, _ = m.split_heads(torch.randn(1, 5, 8, dtype=F64))
    a = m.weights(q, k, None, None, True)  # causal: query 0 sees key 0 only
    torch.testing.assert_close(a[0, :, 0, 0], m.shift.detach(), rtol=0, atol=1e-12)
    none = m.weights(q, k, torch.zeros(1, 5, dtype=torch.bool), None, False)
    assert (none == 0).all()


def test_fixed_gain_and_eps():
    m = visattn.create_mixer('normalized', 8, num_heads=2, affine=False).eval()
    assert [n for n, _ in m.named_parameters()] == ['qkv.weight', 'proj.weight', 'proj.bias']
    assert torch.equal(m.gain, torch.ones(2)) and 'gain' not in m.state_dict()
    with pytest.raises(ValueError, match='eps'):
        visattn.create_mixer('normalized', 8, num_heads=2, eps=0.)
