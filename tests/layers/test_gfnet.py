"""GFNet's global filter (``gfnet``): a float64 reference with the 2-D DFT written as explicit matrix products (not
``torch.fft``), outputs and every gradient at odd sizes; the filter's interpolation to other sizes against a bicubic
interpolation matrix written from Keys' kernel; the token form; bf16; options and errors."""

import math
import sys
from pathlib import Path

import pytest
import torch

import visattn
from visattn.layers.gfnet import global_filter, resize_global_filter

sys.path.insert(0, str(Path(__file__).parent))
from _random_params import randomize  # noqa: E402

SIZES = [(7, 9), (13, 17), (1, 1), (6, 8)]


def dft_matrices(H, W):
    """Forward DFT matrices (``rfft2``, ortho): F_H [H, H] and F_W [W//2+1, W], X = F_H x F_Wᵀ / √(HW); the inverse
    ones G_H [H, H], G_W [W, W//2+1] with the weights c_v of a real map's half spectrum: y = Re(G_H X G_Wᵀ) / √(HW)."""
    u, h = torch.arange(H, dtype=torch.float64)[:, None], torch.arange(H, dtype=torch.float64)[None]
    v, w = torch.arange(W // 2 + 1, dtype=torch.float64)[:, None], torch.arange(W, dtype=torch.float64)[None]
    f_h = torch.exp(-2j * math.pi * u * h / H)
    f_w = torch.exp(-2j * math.pi * v * w / W)
    c = torch.full((W // 2 + 1, 1), 2.0, dtype=torch.float64)
    c[0] = 1
    if W % 2 == 0:
        c[-1] = 1
    return f_h, f_w, f_h.conj().T, (c * f_w.conj()).T


def dft2(x):
    """Half spectrum of a real [B, C, H, W] map as explicit matrix products: [B, C, H, W//2+1] complex."""
    H, W = x.shape[-2:]
    f_h, f_w, _, _ = dft_matrices(H, W)
    return f_h @ x.to(torch.complex128) @ f_w.T / math.sqrt(H * W)


def idft2(X, H, W):
    """Inverse of `dft2` for a half spectrum [B, C, H, W//2+1] (any, not only Hermitian): the real map."""
    _, _, g_h, g_w = dft_matrices(H, W)
    return (g_h @ X @ g_w.T).real / math.sqrt(H * W)


def ref_global_filter(x, weight):
    """y = F⁻¹(K ⊙ F(x)), K = weight[..., 0] + i weight[..., 1] of shape [H, W//2+1, C]."""
    H, W = x.shape[-2:]
    k = torch.complex(weight[..., 0], weight[..., 1]).permute(2, 0, 1)
    return idft2(dft2(x) * k, H, W)


def cubic_matrix(n_out, n_in, a=-0.75):
    """1-D bicubic interpolation (Keys' kernel, a = -0.75, align_corners=True, indices clamped at the borders):
    the [n_out, n_in] matrix."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    for i in range(n_out):
        src = i * scale
        i0 = math.floor(src)
        t = src - i0

        def k(d):
            d = abs(d)
            if d <= 1:
                return ((a + 2) * d - (a + 3)) * d * d + 1
            if d < 2:
                return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
            return 0.0

        for off in (-1, 0, 1, 2):
            m[i, min(max(i0 + off, 0), n_in - 1)] += k(off - t)
    return m


def ref_resize(weight, H, W):
    """The filter [h, w', C, 2] resized to [H, W//2+1, C, 2] by the interpolation matrices (both parts, every C)."""
    m_h, m_w = cubic_matrix(H, weight.shape[0]), cubic_matrix(W // 2 + 1, weight.shape[1])
    return torch.einsum('ip,pqcr,jq->ijcr', m_h, weight, m_w)


def _random(m):
    return randomize(m.double(), 0.5, lambda n, p: False)


def _check(m, x, ref):
    x = x.double().requires_grad_()
    out, want = m(x), ref(x)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    params = list(m.parameters())
    got = torch.autograd.grad(out, [x] + params, g)
    exp = torch.autograd.grad(want, [x] + params, g)
    for name, a, b in zip(['x'] + [n for n, _ in m.named_parameters()], got, exp):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f'gradient of {name}')


def test_dft_reference_is_the_fft():
    """The explicit DFT matrices are the transforms the block is meant to compute (for a Hermitian spectrum)."""
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    X = dft2(x)
    torch.testing.assert_close(X, torch.fft.rfft2(x, norm='ortho'))
    torch.testing.assert_close(idft2(X, 7, 8), x)


@pytest.mark.parametrize('hw', SIZES)
def test_reference_at_the_built_size(hw):
    m = _random(visattn.create_attn('gfnet', 6, feat_size=hw))
    assert m.filter_for(*hw) is m.complex_weight
    _check(m, torch.randn(2, 6, *hw), lambda x: ref_global_filter(x, m.complex_weight))


@pytest.mark.parametrize('hw', [(13, 17), (7, 9), (1, 1), (28, 28)])
def test_reference_at_another_size(hw):
    """Built for 14 × 14 (a [14, 8] filter), run at another size: the filter is the bicubic interpolation of the
    frequency-domain filter (align_corners=True, as the released code), gradients flow back through it."""
    m = _random(visattn.create_attn('gfnet', 4))
    assert m.complex_weight.shape == (14, 8, 4, 2)
    torch.testing.assert_close(m.filter_for(*hw), ref_resize(m.complex_weight, *hw), rtol=1e-12, atol=1e-12)
    _check(m, torch.randn(2, 4, *hw), lambda x: ref_global_filter(x, ref_resize(m.complex_weight, *hw)))


def test_same_spectrum_shape_uses_the_filter_as_is():
    """A 14 × 15 map has a [14, 8] half spectrum, as 14 × 14: no interpolation, as the released code."""
    m = visattn.create_attn('gfnet', 4)
    assert m.filter_for(14, 15) is m.complex_weight
    assert m.filter_for(14, 16).shape == (14, 9, 4, 2)


def test_one_pixel_map_takes_the_dc_entry():
    """At 1 × 1 the interpolated filter is its (0, 0) entry (align_corners=True), and the block scales each channel
    by its real part."""
    m = _random(visattn.create_attn('gfnet', 5))
    x = torch.randn(3, 5, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(m.filter_for(1, 1)[0, 0], m.complex_weight[0, 0])
    torch.testing.assert_close(m(x), x * m.complex_weight[0, 0, :, 0].view(1, 5, 1, 1))


def test_interpolation_matches_the_released_recipe():
    """The released fine-tuning code's recipe, [h, w, C, 2] -> [1, 2C, h, w] -> bicubic (align_corners=True) -> back."""
    w = torch.randn(14, 8, 3, 2, dtype=torch.float64)
    img = w.reshape(1, 14, 8, 6).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(img, size=(24, 13), mode='bicubic', align_corners=True)
    torch.testing.assert_close(resize_global_filter(w, 24, 24), want.permute(0, 2, 3, 1).reshape(24, 13, 3, 2))


def test_token_form():
    """The function over [B, H, W, C] (the token form's layout) equals the NCHW one."""
    x, w = torch.randn(2, 6, 7, 9, dtype=torch.float64), torch.randn(7, 5, 6, 2, dtype=torch.float64)
    torch.testing.assert_close(global_filter(x.permute(0, 2, 3, 1), w, channels_last=True),
                               global_filter(x, w).permute(0, 2, 3, 1))


def test_defaults_and_init():
    m = visattn.create_attn('gfnet', 384)
    assert m.feat_size == (14, 14) and m.complex_weight.shape == (14, 8, 384, 2)
    assert abs(m.complex_weight.std().item() - 0.02) < 2e-3
    assert visattn.create_attn('gfnet', 8, feat_size=7).feat_size == (7, 7)
    assert visattn.info('gfnet').family == 'token-mixing'


def test_bf16():
    """16-bit inputs: FFT in float32 inside (torch.fft has no bf16 on a CPU), output in bf16."""
    m = visattn.create_attn('gfnet', 8, feat_size=(7, 9))
    x = torch.randn(2, 8, 7, 9)
    y = m(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), m(x), rtol=0.05, atol=0.02)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert torch.isfinite(m(x)).all()


@pytest.mark.parametrize('feat_size', [0, (7, 0), (7, 8, 9), -3])
def test_bad_feat_size(feat_size):
    with pytest.raises(ValueError, match='feat_size'):
        visattn.create_attn('gfnet', 8, feat_size=feat_size)


def test_bad_input():
    m = visattn.create_attn('gfnet', 8)
    with pytest.raises(ValueError, match='GlobalFilter'):
        m(torch.randn(2, 4, 7, 7))
    with pytest.raises(TypeError, match='feat_size'):
        visattn.create_attn('gfnet', 8, feat_size=7.5)


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
def test_scripts():
    m = visattn.create_attn('gfnet', 8, feat_size=(7, 9)).eval()
    scripted = torch.jit.script(m)
    for hw in [(7, 9), (11, 6)]:
        x = torch.randn(2, 8, *hw)
        torch.testing.assert_close(scripted(x), m(x))
