"""Transformer-MGK (registered as ``cosine``) against its posterior written from the paper's Gaussian mixture (the
two Gaussian densities of every key position, weighted by π and normalised over the positions), outputs and
gradients of every parameter; padding, causal and float masks; the hard-E-step variant; π's scale invariance."""

import math
import sys
from pathlib import Path

import pytest
import torch

from visattn.mixers import masked_softmax

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, build, linear, out_proj, qkv, split  # noqa: E402

F64 = dict(dtype=torch.float64)
N, C, H = 11, 24, 3
D = C // H


def reference(m, t, allowed=None, bias=None):
    """``a_ij ∝ Σ_r π_r N(q_i; k_jr, σ²I)`` with σ² = √D (hard: the nearer key only), normalised over the allowed
    j, times v."""
    q, k1, v = qkv(m, t)
    k2 = split(linear(t, dict(m.named_parameters()), 'k2'), H)
    var = math.sqrt(D)
    dens = [torch.exp(-(q[:, :, :, None] - kr[:, :, None]).square().sum(-1) / (2 * var)) for kr in (k1, k2)]
    if m.mixture == 'hard':
        a = torch.maximum(*dens)
    else:
        pi = m.pi.clamp(0, 1)
        a = pi[0] * dens[0] + pi[1] * dens[1]
    if bias is not None:
        a = a * torch.exp(bias)
    if allowed is not None:
        a = a * allowed
    return out_proj(m, a @ v / a.sum(-1, keepdim=True))


def _mgk(**kw):
    m = build('cosine', C, H, **kw)
    if m.pi is not None:
        with torch.no_grad():
            m.pi.copy_(torch.tensor([0.7, 0.2]))  # inside [0, 1]: both weights get a gradient
    return m


def test_matches_the_gaussian_mixture():
    m = _mgk()
    assert_matches(m, torch.randn(2, N, C, **F64), lambda t: reference(m, t))


def test_masks():
    m = _mgk()
    x = torch.randn(2, N, C, **F64)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[0, 7:] = False
    mask[1, :3] = False
    assert_matches(m, x, lambda t: reference(m, t, mask[:, None, None, :]), attn_mask=mask)
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    assert_matches(m, x, lambda t: reference(m, t, causal), is_causal=True)
    bias = torch.randn(2, H, N, N, **F64)
    assert_matches(m, x, lambda t: reference(m, t, bias=bias), attn_mask=bias)


def test_fused_and_explicit_paths_agree():
    """The 2N-key softmax attention (eval, or training without dropout) and the explicit N×N weights (training with
    attention dropout) compute the same function under every mask, zeros for a row that sees no key."""
    m = _mgk()
    x = torch.randn(2, N, C, **F64)
    q, k1, v = qkv(m, x)
    k2 = split(linear(x, dict(m.named_parameters()), 'k2'), H)
    kpm = torch.ones(2, N, dtype=torch.bool)
    kpm[1] = False
    dense = torch.rand(2, 1, N, N) > 0.3
    for key_padding, mask, causal in ((None, None, False), (kpm, None, True), (None, dense, False),
                                      (None, torch.randn(1, H, N, N, **F64), True)):
        explicit = masked_softmax(m.logits(q, k1, k2), key_padding, mask, causal) @ v
        torch.testing.assert_close(m.keys_as_sdpa(q, k1, k2, v, key_padding, mask, causal), explicit)
    assert m.keys_as_sdpa(q, k1, k2, v, kpm, None, False)[1].abs().max() == 0


def test_hard_e_step():
    m = build('cosine', C, H, mixture='hard')
    assert m.pi is None
    assert_matches(m, torch.randn(2, N, C, **F64), lambda t: reference(m, t))


def test_only_the_ratio_of_the_weights_matters():
    m = _mgk()
    x = torch.randn(1, N, C, **F64)
    with torch.no_grad():
        out = m(x)
        m.pi.mul_(0.25)
        torch.testing.assert_close(m(x), out)
        m.pi.fill_(0.)  # both clamped to the same floor: equal weights, not 0 / 0
        equal = m(x)
        m.pi.fill_(1.)
        torch.testing.assert_close(equal, m(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match='mixture'):
        build('cosine', C, H, mixture='x')
