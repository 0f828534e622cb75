"""SGE against a float64 reference written from the paper's equations (similarity with the group's global feature,
normalisation over the positions, per-group scale and shift, sigmoid), at odd sizes and 1×1, for each option."""

import math
import sys
from pathlib import Path

import pytest
import torch

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from test_gating_blocks import _check_against_reference, _p  # noqa: E402


def ref_sge(x, m, groups, unbiased=True, eps=1e-5):
    """Per group: c_i = g · x_i (g = GAP of the group), ĉ = (c − μ_c) / (σ_c + ε), a = γ ĉ + β, x̂ = x · σ(a);
    σ_c over the m positions (divisor m − 1 when ``unbiased``); on one position ĉ = 0."""
    B, C, H, W = x.shape
    xg = x.reshape(B, groups, C // groups, H, W)
    g = xg.mean((3, 4), keepdim=True)
    c = (xg * g).sum(2)  # [B, G, H, W]
    t = c - c.mean((2, 3), keepdim=True)
    if H * W > 1:
        std = t.std((2, 3), correction=1 if unbiased else 0, keepdim=True)
    else:
        std = torch.zeros_like(t)
    a = t / (std + eps) * _p(m, 'weight').view(1, -1, 1, 1) + _p(m, 'bias').view(1, -1, 1, 1)
    return (xg * torch.sigmoid(a).unsqueeze(2)).reshape(B, C, H, W)


@pytest.mark.parametrize('hw', [(7, 9), (13, 17), (1, 1), (1, 6)])
@pytest.mark.parametrize('channels, groups', [(64, 64), (64, 8), (24, 3)])
@pytest.mark.parametrize('unbiased', [True, False])
def test_reference(hw, channels, groups, unbiased):
    m = visattn.create_attn('sge', channels, groups=groups, unbiased=unbiased)
    _check_against_reference(m, lambda x, m: ref_sge(x, m, groups, unbiased), torch.randn(2, channels, *hw))


@pytest.mark.parametrize('training', [False, True])
def test_modes_and_eps(training):
    m = visattn.create_attn('sge', 32, groups=4, eps=0.3)
    _check_against_reference(m, lambda x, m: ref_sge(x, m, 4, eps=0.3), torch.randn(3, 32, 5, 7), training)


def test_released_code_expression():
    """The released forward: ``t = Σ_c x · GAP(x)``, ``(t − mean) / (t.std() + 1e-5)``, ``· weight + bias``."""
    m = visattn.create_attn('sge', 64, groups=16, dtype=torch.float64)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    x = torch.randn(2, 64, 7, 9, dtype=torch.float64)
    b, c, h, w = x.shape
    xg = x.view(b * 16, -1, h, w)
    t = (xg * xg.mean((2, 3), keepdim=True)).sum(1, keepdim=True).view(b * 16, -1)
    t = t - t.mean(1, keepdim=True)
    t = (t / (t.std(1, keepdim=True) + 1e-5)).view(b, 16, h, w) * m.weight + m.bias
    want = (xg * torch.sigmoid(t.view(b * 16, 1, h, w))).view(b, c, h, w)
    torch.testing.assert_close(m(x), want, rtol=1e-12, atol=1e-12)


def test_initialisation_and_state_dict():
    m = visattn.create_attn('sge', 128)
    assert m.groups == 64 and set(m.state_dict()) == {'weight', 'bias'}
    assert m.weight.shape == m.bias.shape == (1, 64, 1, 1)
    assert (m.weight == 0).all() and (m.bias == 1).all()
    x = torch.randn(2, 128, 5, 7)
    torch.testing.assert_close(m(x), x * (1 / (1 + math.exp(-1))))  # γ = 0: the gate is σ(β) = σ(1)


def test_one_by_one_and_constant_maps_are_finite():
    m = visattn.create_attn('sge', 16, groups=4, dtype=torch.float64)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    for x in (torch.randn(2, 16, 1, 1, dtype=torch.float64), torch.full((2, 16, 5, 7), 2.0, dtype=torch.float64)):
        x.requires_grad_()
        y = m(x)
        gate = torch.sigmoid(m.bias).repeat_interleave(4, 1)  # ĉ = 0: x̂ = x · σ(β)
        torch.testing.assert_close(y, x * gate)
        grads = torch.autograd.grad(y.sum(), [x, m.weight, m.bias])
        assert all(torch.isfinite(g).all() for g in grads)
        torch.testing.assert_close(grads[0], gate.expand_as(x))


def test_bad_groups():
    with pytest.raises(ValueError, match='groups must divide channels=48, got groups=64'):
        visattn.create_attn('sge', 48)
    with pytest.raises(TypeError, match='groups'):
        visattn.create_attn('sge', 64, groups=2.0)


def test_scripted_and_bf16():
    m = visattn.create_attn('sge', 32, groups=8)
    with torch.no_grad():
        m.weight.normal_()
    x = torch.randn(2, 32, 5, 7)
    torch.testing.assert_close(torch.jit.script(m)(x), m(x))
    y16 = m.to(torch.bfloat16)(x.bfloat16())
    assert y16.dtype == torch.bfloat16
