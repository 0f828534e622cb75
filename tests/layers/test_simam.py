"""SimAM against a float64 reference written from the paper's energy (Eq. 5 as the minimal energy e*, inverted),
with the released code's n = H·W − 1, at odd sizes and on a 1×1 map (n = 0), for each λ."""

import math
import sys
from pathlib import Path

import pytest
import torch

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from test_gating_blocks import _check_against_reference  # noqa: E402


def ref_simam(x, lam):
    """y = x · σ(1 / e*), e*_t = 4 (σ² + λ) / ((t − μ)² + 2σ² + 2λ), μ over the M positions, σ² = Σ (x − μ)² / (M − 1);
    on a 1×1 map the sum over the other neurons is empty: σ² = 0 (and t = μ)."""
    m = x.shape[2] * x.shape[3]
    mu = x.mean((2, 3), keepdim=True)
    d = (x - mu) ** 2
    var = d.sum((2, 3), keepdim=True) / (m - 1) if m > 1 else torch.zeros_like(mu)
    energy = 4 * (var + lam) / (d + 2 * var + 2 * lam)
    return x * torch.sigmoid(1 / energy)


@pytest.mark.parametrize('hw', [(7, 9), (13, 17), (1, 1), (1, 5), (2, 1)])
@pytest.mark.parametrize('lam', [1e-4, 0.1])
@pytest.mark.parametrize('training', [False, True])
def test_reference(hw, lam, training):
    m = visattn.create_attn('simam', 16, e_lambda=lam)
    _check_against_reference(m, lambda x, m: ref_simam(x, lam), torch.randn(2, 16, *hw) * 3 + 1, training)


def test_released_code_expression():
    """The released code's expression, ``d / (4 (Σd / n + λ)) + 0.5`` with n = H·W − 1."""
    x = torch.randn(2, 8, 7, 9, dtype=torch.float64)
    d = (x - x.mean((2, 3), keepdim=True)).pow(2)
    want = x * torch.sigmoid(d / (4 * (d.sum((2, 3), keepdim=True) / (7 * 9 - 1) + 1e-4)) + 0.5)
    torch.testing.assert_close(visattn.create_attn('simam', 8)(x), want, rtol=1e-12, atol=1e-12)


def test_one_by_one_map_is_the_constant_gate():
    x = torch.randn(3, 8, 1, 1, dtype=torch.float64, requires_grad=True)
    y = visattn.create_attn('simam', 8)(x)
    half = 1 / (1 + math.exp(-0.5))
    torch.testing.assert_close(y, x * half, rtol=1e-15, atol=0)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, torch.full_like(x, half))


def test_constant_map_has_finite_gradient():
    x = torch.full((2, 4, 5, 7), 3.0, dtype=torch.float64, requires_grad=True)
    y = visattn.create_attn('simam', 4)(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, x * (1 / (1 + math.exp(-0.5))))
    assert torch.isfinite(g).all()


def test_no_parameters_and_metadata():
    m = visattn.create_attn('simam', 8)
    assert not list(m.parameters()) and not list(m.buffers()) and m.e_lambda == 1e-4
    info = visattn.info('simam')
    assert info.family == 'spatial' and info.arxiv == '' and info.year == 2021
    doc = sys.modules[visattn.get_attn('simam').__module__].__doc__
    assert 'proceedings.mlr.press/v139/yang21o' in doc and 'PMLR' in doc


@pytest.mark.parametrize('value', [0, -1.0])
def test_bad_lambda(value):
    with pytest.raises(ValueError, match='e_lambda'):
        visattn.create_attn('simam', 8, e_lambda=value)


def test_scripted_and_float32():
    m = visattn.create_attn('simam', 8, e_lambda=0.1)
    x = torch.randn(2, 8, 5, 7)
    y = m(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref_simam(x.double(), 0.1).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.jit.script(m)(x), y)
    torch.testing.assert_close(torch.jit.script(m)(x[:, :, :1, :1]), m(x[:, :, :1, :1]))
