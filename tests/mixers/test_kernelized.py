"""The Kernelized Transformer against its kernel written from the paper's spectral form (the cosine of the
frequency-weighted differences for RKS, the exponential for PRF), outputs and gradients, causal and padded; the
convergence of the random-feature kernel to its closed form as the features grow; seeds and arguments."""

import math
import sys
from pathlib import Path

import pytest
import torch

from visattn.mixers._sparse_utils import hash_normal

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, build, out_proj, qkv  # noqa: E402

F64 = dict(dtype=torch.float64)
N, C, H = 11, 24, 3
D = C // H


def frequencies(m):
    """ω₊ [H, D, m] (RKS, with ω₋ = ω₊ - 2μ) or ω (PRF) from the module's ε, means and spreads."""
    eps = hash_normal(m.seed, [D, m.nb_features]).to(torch.float64)
    if m.kernel == 'rks':
        return torch.stack([m.sigma[h].T @ eps + m.mean[h][:, None] for h in range(H)])
    return torch.stack([m.mean[h][:, None] + torch.exp(m.sigma[h] / 2)[:, None] * eps for h in range(H)])


def kernel_matrix(m, q, k):
    """The random-feature kernel [B, H, N, N] of the scaled q, k, from the spectral form directly."""
    x, y = q * D ** -0.25, k * D ** -0.25
    omega = frequencies(m)
    if m.kernel == 'rks':
        diff = x[:, :, :, None, :] - y[:, :, None, :, :]  # [B, H, N, N, D]
        plus = torch.einsum('bhijd,hdm->bhijm', diff, omega)
        minus = plus - 2 * torch.einsum('bhijd,hd->bhij', diff, m.mean)[..., None]
        s = 0. if m.smoothing is None else m.smoothing
        return (torch.cos(plus) + torch.cos(minus)).sum(-1) / m.nb_features + s ** 2
    total = x[:, :, :, None, :] + y[:, :, None, :, :]
    e = torch.einsum('bhijd,hdm->bhijm', total, omega)
    norms = x.square().sum(-1)[..., :, None] + y.square().sum(-1)[..., None, :]
    return torch.exp(e - norms[..., None]).sum(-1) / m.nb_features


def reference(m, x, causal=False, keep=None):
    """Kernel attention ``K V / (K 1 + eps)`` (PRF: eps ~ 0, its features are exact up to a per-query factor)."""
    eps = 1e-6 if m.kernel == 'rks' else 0.
    q, k, v = qkv(m, x)
    K = kernel_matrix(m, q, k)
    if causal:
        K = K.tril()
    if keep is not None:
        K = K * keep[:, None, None, :]
    return out_proj(m, K @ v / (K.sum(-1, keepdim=True) + eps))


@pytest.mark.parametrize('kernel', ['rks', 'prf'])
@pytest.mark.parametrize('causal', [False, True])
def test_matches_the_spectral_kernel(kernel, causal):
    m = build('kernelized', C, H, kernel=kernel, nb_features=5)
    x = torch.randn(2, N, C, **F64)
    assert_matches(m, x, lambda t: reference(m, t, causal), is_causal=causal)


@pytest.mark.parametrize('kernel', ['rks', 'prf'])
def test_padding(kernel):
    m = build('kernelized', C, H, kernel=kernel, nb_features=5)
    x = torch.randn(2, N, C, **F64)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[0, 7:] = False
    mask[1, :2] = False
    keep = mask.to(torch.float64)
    assert_matches(m, x, lambda t: reference(m, t, keep=keep), attn_mask=mask)


def test_without_smoothing():
    m = build('kernelized', C, H, nb_features=5, smoothing=None)
    x = 0.2 * torch.randn(2, N, C, **F64)  # small differences: a kernel near 2, far from a zero normaliser
    assert m.features(*qkv(m, x)[:2], None)[0].shape[-1] == 4 * 5
    assert_matches(m, x, lambda t: reference(m, t))


@pytest.mark.parametrize('kernel', ['rks', 'prf'])
def test_features_converge_to_the_closed_form_kernel(kernel):
    """The random-feature kernel tends to ``2 exp(-|Σ_h τ|²/2) cos(μ_hᵀ τ) + s²`` (RKS) or ``E exp(ωᵀ(x + y)) ·
    exp(-|x|² - |y|²)`` (PRF) as the frequencies grow: the error falls like 1/√m, over several seeds."""
    q, k = torch.randn(2, 1, H, 6, D, **F64).unbind(0)
    errors = []
    for m_features in (16, 256, 4096):
        err = 0.
        for seed in range(4):
            m = build('kernelized', C, H, kernel=kernel, nb_features=m_features, seed=seed)
            with torch.no_grad():
                if kernel == 'rks':
                    m.mean.mul_(2.)  # a kernel far from the plain Gaussian one
                else:
                    m.sigma.fill_(-1.)  # log σ²: moderate spreads, so that the features' variance is finite
                K = kernel_matrix(m, q, k)
                x, y = q * D ** -0.25, k * D ** -0.25
                tau = x[:, :, :, None, :] - y[:, :, None, :, :]
                if kernel == 'rks':
                    spread = torch.einsum('hsd,bhijd->bhijs', m.sigma, tau)
                    exact = 2 * torch.exp(-spread.square().sum(-1) / 2) \
                        * torch.cos(torch.einsum('hd,bhijd->bhij', m.mean, tau)) + 1
                else:
                    t = x[:, :, :, None, :] + y[:, :, None, :, :]
                    var = torch.exp(m.sigma)[None, :, None, None, :]
                    exact = torch.exp((m.mean[None, :, None, None, :] * t).sum(-1) + (var * t.square()).sum(-1) / 2
                                      - x.square().sum(-1)[..., :, None] - y.square().sum(-1)[..., None, :])
            err += ((K - exact).abs().max() / exact.abs().max()).item() / 4
        errors.append(err)
    assert errors[1] < errors[0] / 2.5 and errors[2] < errors[1] / 2.5, errors
    assert errors[2] < 0.05, errors


def test_seed_fixes_the_samples_and_redraw_draws_new_ones():
    x = torch.randn(1, N, C, **F64)
    a, b = build('kernelized', C, H, seed=3), build('kernelized', C, H, seed=3)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
        other = build('kernelized', C, H, seed=4)
        other.load_state_dict(a.state_dict())  # the seed travels in the state dict
        torch.testing.assert_close(other(x), a(x), rtol=0, atol=0)
        c = build('kernelized', C, H, seed=3, redraw_each_forward=True).train()
        c.load_state_dict(a.state_dict())
        assert not torch.allclose(c(x), c(x))
        torch.testing.assert_close(c.eval()(x), a(x), rtol=0, atol=0)


def test_default_features_and_bad_arguments():
    m = build('kernelized', C, H)
    assert m.nb_features == round(D * math.log(D))
    for kw in (dict(kernel='x'), dict(nb_features=0), dict(smoothing=0.)):
        with pytest.raises(ValueError, match=next(iter(kw))):
            build('kernelized', C, H, **kw)
