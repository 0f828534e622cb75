"""AFNO (``afno``): a float64 reference with the DFT as explicit matrix products and the block-diagonal complex MLP
written with real and imaginary parts as the paper's equations (outputs and every gradient at odd sizes), the soft
and the hard thresholds, the released code's parameter layout, the token form, bf16, options and errors."""

import sys
from pathlib import Path

import pytest
import torch

import visattn
from visattn.layers.afno import afno_2d

sys.path.insert(0, str(Path(__file__).parent))
from _random_params import randomize  # noqa: E402
from test_gfnet import _check, dft2, idft2  # noqa: E402


def softshrink(t, lam):
    return torch.sign(t) * torch.clamp(t.abs() - lam, min=0)


def ref_afno(x, m, lam=None, fraction=None):
    """y = x + F⁻¹(S_λ(Z2)), Z1 = ReLU_ri(X W1 + b1), Z2 = Z1 W2 + b2 per block (real and imaginary parts written
    out), the modes v >= int((W//2+1)·fraction) zeroed."""
    lam = m.sparsity_threshold if lam is None else lam
    fraction = m.hard_thresholding_fraction if fraction is None else fraction
    B, C, H, W = x.shape
    k, bs = m.num_blocks, C // m.num_blocks
    X = dft2(x)  # [B, C, H, W//2+1]
    Xr, Xi = X.real.reshape(B, k, bs, H, -1), X.imag.reshape(B, k, bs, H, -1)
    w1, b1, w2, b2 = m.w1, m.b1, m.w2, m.b2

    def mm(z, w):  # per block: z [B, k, i, H, V], w [k, i, o] -> [B, k, o, H, V]
        return torch.stack([torch.einsum('bihv,io->bohv', z[:, j], w[j]) for j in range(k)], 1)

    z1r = torch.relu(mm(Xr, w1[0]) - mm(Xi, w1[1]) + b1[0][None, :, :, None, None])
    z1i = torch.relu(mm(Xi, w1[0]) + mm(Xr, w1[1]) + b1[1][None, :, :, None, None])
    z2r = mm(z1r, w2[0]) - mm(z1i, w2[1]) + b2[0][None, :, :, None, None]
    z2i = mm(z1i, w2[0]) + mm(z1r, w2[1]) + b2[1][None, :, :, None, None]
    Z = torch.complex(softshrink(z2r, lam), softshrink(z2i, lam)).reshape(B, C, H, -1)
    kept = int((W // 2 + 1) * fraction)
    Z = Z * (torch.arange(W // 2 + 1) < kept).to(torch.float64)
    return x + idft2(Z, H, W)


def _random(m, scale=0.5):
    return randomize(m.double(), scale, lambda n, p: False)


@pytest.mark.parametrize('hw', [(7, 9), (13, 17), (1, 1), (6, 8)])
def test_reference(hw):
    m = _random(visattn.create_attn('afno', 16, num_blocks=4))
    _check(m, torch.randn(2, 16, *hw), lambda x: ref_afno(x, m))


def test_soft_threshold_zeroes_small_modes():
    """With λ comparable to the spectrum, part of it is shrunk to zero (the term is active) and the reference
    still matches; a wrong λ does not."""
    m = _random(visattn.create_attn('afno', 8, num_blocks=2, sparsity_threshold=0.3), 0.3)
    x = torch.randn(2, 8, 7, 9, dtype=torch.float64)
    _check(m, x, lambda x: ref_afno(x, m))
    assert not torch.allclose(m(x), ref_afno(x, m, lam=0.0), atol=1e-6)
    off = _random(visattn.create_attn('afno', 8, num_blocks=2, sparsity_threshold=0.))
    _check(off, x, lambda x: ref_afno(x, off))


@pytest.mark.parametrize('fraction', [0.5, 0.34])
def test_hard_threshold(fraction):
    m = _random(visattn.create_attn('afno', 8, num_blocks=2, hard_thresholding_fraction=fraction))
    x = torch.randn(2, 8, 7, 10, dtype=torch.float64)
    _check(m, x, lambda x: ref_afno(x, m))
    assert not torch.allclose(m(x), ref_afno(x, m, fraction=1.0), atol=1e-6)


def test_no_mode_kept_is_the_identity():
    """A 1-pixel-wide map keeps int(1 · 0.5) = 0 modes: the spectral term vanishes, as in the released code."""
    m = _random(visattn.create_attn('afno', 8, num_blocks=2, hard_thresholding_fraction=0.5))
    x = torch.randn(2, 8, 5, 1, dtype=torch.float64)
    torch.testing.assert_close(m(x), x)


def test_hidden_size_factor():
    m = _random(visattn.create_attn('afno', 8, num_blocks=2, hidden_size_factor=3))
    assert m.w1.shape == (2, 2, 4, 12) and m.w2.shape == (2, 2, 12, 4) and m.b1.shape == (2, 2, 12)
    _check(m, torch.randn(2, 8, 7, 9), lambda x: ref_afno(x, m))


def test_released_layout_and_defaults():
    """The released AFNO2D's parameter names, shapes and init (0.02 · randn): its state dict loads."""
    m = visattn.create_attn('afno', 768)
    assert (m.num_blocks, m.sparsity_threshold, m.hard_thresholding_fraction, m.hidden_size_factor) == (8, .01, 1., 1)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {'w1': (2, 8, 96, 96), 'b1': (2, 8, 96), 'w2': (2, 8, 96, 96), 'b2': (2, 8, 96)}
    assert abs(m.w1.std().item() - 0.02) < 1e-3
    m.load_state_dict({n: torch.randn(s) for n, s in shapes.items()})


def test_token_form():
    m = _random(visattn.create_attn('afno', 8, num_blocks=2))
    x = torch.randn(2, 8, 7, 9, dtype=torch.float64)
    got = afno_2d(x.permute(0, 2, 3, 1), m.w1, m.b1, m.w2, m.b2, 0.01, 1.0, channels_last=True)
    torch.testing.assert_close(got, (m(x) - x).permute(0, 2, 3, 1))


def test_bf16():
    m = visattn.create_attn('afno', 16, num_blocks=4)
    x = torch.randn(2, 16, 7, 9)
    y = m(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), m(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize('kwargs, arg', [
    (dict(num_blocks=3), 'num_blocks'),
    (dict(num_blocks=0), 'num_blocks'),
    (dict(hard_thresholding_fraction=0.), 'hard_thresholding_fraction'),
    (dict(hard_thresholding_fraction=1.5), 'hard_thresholding_fraction'),
    (dict(sparsity_threshold=-0.1), 'sparsity_threshold'),
    (dict(hidden_size_factor=0), 'hidden_size_factor'),
])
def test_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        visattn.create_attn('afno', 16, **kwargs)


def test_bad_input():
    with pytest.raises(ValueError, match='AFNO2d'):
        visattn.create_attn('afno', 16)(torch.randn(1, 8, 4, 4))


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
def test_scripts():
    m = visattn.create_attn('afno', 16, num_blocks=4, hard_thresholding_fraction=0.5).eval()
    scripted = torch.jit.script(m)
    x = torch.randn(2, 16, 7, 9)
    torch.testing.assert_close(scripted(x), m(x))
