"""FourierFormer against the generalized Fourier integral weights written from the paper (the product over the
dimensions of (sin(R Δ) / (R Δ))^p, normalised over the keys), outputs and gradients including R; masks, query
blocks, a fixed R, the log-domain stability where the product underflows, arguments."""

import sys
from pathlib import Path

import pytest
import torch

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, build, out_proj, qkv  # noqa: E402

F64 = dict(dtype=torch.float64)
N, C, H = 11, 24, 3
D = C // H


def weights(m, q, k):
    """``Π_d (sin(R Δ_d) / (R Δ_d))^p`` [B, H, N, N], from an explicit product over the dimensions."""
    r = m.radius[0]
    w = torch.ones(q.shape[0], H, q.shape[2], k.shape[2], **F64)
    for d in range(D):
        z = r * (q[:, :, :, None, d] - k[:, :, None, :, d])
        w = w * (torch.sin(z) / z) ** m.power
    return w


def reference(m, t, allowed=None, bias=None):
    q, k, v = qkv(m, t)
    w = weights(m, q, k) * (1. if bias is None else torch.exp(bias))
    w = w if allowed is None else torch.where(allowed, w, torch.zeros_like(w))
    return out_proj(m, w @ v / w.sum(-1, keepdim=True))


def _fourier(**kw):
    m = build('fourierformer', C, H, **kw)
    with torch.no_grad():
        m.radius.fill_(0.7)
    return m


def test_matches_the_fourier_integral_weights():
    m = _fourier()
    assert_matches(m, torch.randn(2, N, C, **F64), lambda t: reference(m, t))


def test_masks_and_blocks():
    m = _fourier(block_elements=200)  # several query blocks
    x = torch.randn(2, N, C, **F64)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[0, 6:] = False
    mask[1, [2, 3]] = False
    assert_matches(m, x, lambda t: reference(m, t, mask[:, None, None, :]), attn_mask=mask)
    assert_matches(m, x, lambda t: reference(m, t, torch.ones(N, N, dtype=torch.bool).tril()), is_causal=True)
    bias = torch.randn(2, H, N, N, **F64)
    assert_matches(m, x, lambda t: reference(m, t, bias=bias), attn_mask=bias)


def test_power_and_fixed_radius():
    m = build('fourierformer', C, H, power=2, learn_radius=False, radius=0.5)
    assert 'radius' in dict(m.named_buffers()) and 'radius' not in dict(m.named_parameters())
    assert_matches(m, torch.randn(2, N, C, **F64), lambda t: reference(m, t))


def test_underflowing_products_stay_normalised():
    """Far keys give products of sincs below the smallest float; the log-domain weights keep the rows normalised
    (the plain product would give 0 / 0)."""
    m = visattn.create_mixer('fourierformer', C, num_heads=H).eval()
    q, k, v = (30 * torch.randn(1, H, N, D) for _ in range(3))
    assert (weights(m, q.double(), k.double()).float() == 0).all(-1).any()
    out = m.attend(q, k, v, None, None, False)
    assert torch.isfinite(out).all() and (out.abs() <= v.abs().amax(-2, keepdim=True) + 1e-4).all()


def test_bad_arguments():
    for kw in (dict(power=3), dict(power=0), dict(radius=0.), dict(block_elements=0)):
        with pytest.raises(ValueError, match=next(iter(kw))):
            build('fourierformer', C, H, **kw)
