"""Scatterbrain against a dense float64 reference written from the paper's ``(S + L)``: the exact kernel
``exp(q·k/√D)`` on the window and the Performer estimate ``φ(q)·φ(k)`` (features written from FAVOR+,
``exp(ω·x - |x|²/2) / √m`` with ``x = D^(-1/4)·q``, no shift) elsewhere, one normaliser; outputs and gradients,
padded and causal. Convergence: a window over every key gives exact softmax attention whatever the features, and
the error falls as the features grow."""

import sys
from pathlib import Path

import pytest
import torch

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, build, out_proj, qkv  # noqa: E402

N, C, H = 37, 30, 2
D = C // H


def features(m, t):
    w = m.projection
    t = t * D ** -0.25
    return torch.exp(t @ w.T - t.square().sum(-1, keepdim=True) / 2) / w.shape[0] ** 0.5


def reference(m, x, kpm=None, causal=False):
    q, k, v = qkv(m, x)
    n = x.shape[1]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    keep = torch.ones(x.shape[0], 1, 1, n, dtype=torch.bool) if kpm is None else kpm[:, None, None, :]
    if causal:
        keep = keep & (j <= i)
        window = (j > i - m.window)
    else:
        window = (i - j).abs() <= m.window // 2
    exact = torch.exp(q @ k.transpose(-1, -2) * m.scale)
    low = features(m, q) @ features(m, k).transpose(-1, -2)
    a = torch.where(window, exact, low) * keep
    return out_proj(m, (a @ v) / a.sum(-1, keepdim=True).clamp_min(1e-300))


def make(**kw):
    m = build('scatterbrain', C, H, **kw)
    with torch.no_grad():  # small q and k: the regime where FAVOR+ is accurate with few features
        m.qkv.weight[:2 * C].mul_(0.1)
    return m


@pytest.mark.parametrize('window,features_,causal,chunk', [(5, 16, False, 1 << 20), (9, 7, True, 1 << 20),
                                                           (1, 32, False, 1 << 20), (5, 16, False, 1),
                                                           (9, 7, True, 3100)])
def test_matches_exact_window_plus_low_rank(window, features_, causal, chunk):
    """Also with the window computed one query block at a time (chunk 1) and two blocks at a time (3100)."""
    m = make(window=window, nb_features=features_, chunk_elements=chunk)
    x = torch.randn(2, N, C, dtype=torch.float64)
    kpm = torch.rand(2, N) > 0.3
    kpm[1, :12] = False
    assert_matches(m, x, lambda t: reference(m, t, causal=causal), is_causal=causal)
    assert_matches(m, x, lambda t: reference(m, t, kpm, causal=causal), attn_mask=kpm, is_causal=causal)


@pytest.mark.parametrize('causal', [False, True])
def test_window_over_every_key_is_exact_softmax(causal):
    exact = build('full', C, H)
    x = torch.randn(2, N, C, dtype=torch.float64)
    kpm = torch.rand(2, N) > 0.3
    m = make(window=2 * N + 1, nb_features=3)
    m.load_state_dict({**m.state_dict(), **exact.state_dict()})
    for call in (dict(is_causal=causal), dict(attn_mask=kpm, is_causal=causal)):
        torch.testing.assert_close(m(x, **call), exact(x, **call), rtol=1e-10, atol=1e-10)


def test_error_falls_as_features_grow():
    x = torch.randn(2, N, C, dtype=torch.float64)
    errors = []
    for nb in (8, 64, 512):
        m = make(window=5, nb_features=nb)
        exact = build('full', C, H)
        exact.load_state_dict({k: v for k, v in m.state_dict().items() if k in exact.state_dict()})
        err = 0.
        for seed in range(2):  # averaged over draws of the features
            torch.manual_seed(seed)
            m.redraw_projection()
            err += (m(x) - exact(x)).norm().item() / exact(x).norm().item()
        errors.append(err / 2)
    assert errors[0] > 1.5 * errors[1] and errors[1] > 1.5 * errors[2], errors


def test_is_a_performer_with_a_window():
    m = visattn.create_mixer('scatterbrain', C, num_heads=H, nb_features=10)
    assert isinstance(m, visattn.get_mixer('performer')) and m.projection.shape == (10, D)
    for value in (0, 4):
        with pytest.raises(ValueError, match='window'):
            visattn.create_mixer('scatterbrain', C, num_heads=H, window=value)
