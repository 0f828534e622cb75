"""Ripple attention (``ripple``) against a float64 reference written densely: every query-key pair weighted by the
stick-breaking weight of its Chebyshev ring (the rest of the stick beyond ``num_rings`` and for prefix keys, 1 for
prefix queries), then linear attention with ``elu + 1`` features; key padding; the stick-breaking weights; the
weights' locality; refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import visattn
from visattn.mixers.ripple import ring_weights

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, build, linear, out_proj, qkv  # noqa: E402

F64 = torch.float64


def _pair_weights(m: torch.nn.Module, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """[B, h, N, N]: for a patch query and a patch key at Chebyshev distance d, ``s_d Π_{r<d}(1 - s_r)`` if
    d < R, else ``Π_{r<R}(1 - s_r)`` (the same for prefix keys); 1 for prefix queries."""
    P, h, R = m.num_prefix_tokens, m.num_heads, m.num_rings
    B, N, _ = x.shape
    s = torch.sigmoid(linear(x[:, P:], dict(m.named_parameters()), 'ripple')).reshape(B, H * W, h, R)
    stick, per_ring = torch.ones(B, H * W, h, dtype=x.dtype), []
    for r in range(R):
        per_ring.append(s[..., r] * stick)
        stick = stick * (1 - s[..., r])
    per_ring = torch.stack(per_ring + [stick], -1).permute(0, 2, 1, 3)  # [B, h, HW(query), R + 1]
    row, col = torch.arange(H * W) // W, torch.arange(H * W) % W
    dist = torch.maximum((row[:, None] - row[None, :]).abs(), (col[:, None] - col[None, :]).abs()).clamp_max(R)
    dist = torch.cat([torch.full((H * W, P), R), dist], 1)  # [HW, N]: prefix keys are in the rest
    weights = torch.ones(B, h, N, N, dtype=x.dtype)
    weights[:, :, P:] = torch.gather(per_ring, 3, dist.expand(B, h, H * W, N))
    return weights


def _reference(m, x, H, W, keep=None):
    q, k, v = qkv(m, x)
    scores = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1) * _pair_weights(m, x, H, W)
    if keep is not None:
        scores = scores * keep[:, None, None, :]
    return out_proj(m, scores @ v / scores.sum(-1, keepdim=True))


@pytest.mark.parametrize('rings', [3, 9])
def test_matches_the_dense_equation_with_key_padding(rings):
    H, W, P = 7, 9, 1  # 9 rings cover the grid: the rest of the stick only weighs the prefix token then
    m = build('ripple', 12, 2, feat_size=(H, W), num_prefix_tokens=P, num_rings=rings, qkv_bias=True)
    x = torch.randn(2, P + H * W, 12, dtype=F64)
    keep = torch.ones(2, P + H * W, dtype=torch.bool)
    keep[0, 30:] = False
    keep[1, :5] = False
    assert_matches(m, x, lambda t: _reference(m, t, H, W))
    assert_matches(m, x, lambda t: _reference(m, t, H, W, keep), attn_mask=keep)


def test_stick_breaking_weights_sum_to_one_and_start_halving():
    s = torch.rand(3, 5, dtype=F64)
    w = ring_weights(s)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, dtype=F64))
    torch.testing.assert_close(w[:, 2], s[:, 2] * (1 - s[:, 0]) * (1 - s[:, 1]))
    m = visattn.create_mixer('ripple', 8, num_heads=2, feat_size=4, num_rings=3)
    prop = torch.sigmoid(m.ripple(torch.randn(1, 8))).reshape(2, 3)
    torch.testing.assert_close(ring_weights(prop), torch.tensor([[.5, .25, .125, .125]] * 2))


def test_far_tokens_weigh_less_than_near_ones():
    """With every proportion near 1 (the first ring takes the whole stick), a patch output depends only on its
    ring 0 and, barely, on the rest: moving a far key changes it by a factor ~ρ of what moving the query's own
    token does."""
    m = visattn.create_mixer('ripple', 8, num_heads=2, feat_size=(5, 5), num_prefix_tokens=0, num_rings=2,
                             dtype=F64).eval()
    with torch.no_grad():
        m.ripple.bias.fill_(12.)
    x = torch.randn(1, 25, 8, dtype=F64, requires_grad=True)
    m(x)[0, 12].square().sum().backward()  # the centre token
    near, far = x.grad[0, 12].abs().sum(), x.grad[0, 0].abs().sum()
    assert far < 1e-4 * near


def test_refuses_causal():
    m = visattn.create_mixer('ripple', 8, num_heads=2, feat_size=2, num_prefix_tokens=0)
    with pytest.raises(ValueError, match='causal'):
        m(torch.randn(1, 4, 8), is_causal=True)
