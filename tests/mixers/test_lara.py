"""LARA against its estimator written sample by sample from the paper (explicit Gaussian densities of the target
and of every proposal, the weighting functions α, self-normalisation), outputs and gradients, both weightings, the
learned proposals, padding; its convergence to softmax attention as the samples grow; sampling modes."""

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


def normal_pdf(w, mean):
    return torch.exp(-(w - mean).square().sum(-1) / 2) / (2 * math.pi) ** (w.shape[-1] / 2)


def segment_means(t, real, segments):
    """Means of the real tokens of ``segments`` consecutive segments of length ceil(N / segments): [C, D], [C]."""
    size = math.ceil(t.shape[0] / segments)
    means, ok = [], []
    for c in range(segments):
        rows = [i for i in range(c * size, min((c + 1) * size, t.shape[0])) if real[i]]
        ok.append(bool(rows))
        means.append(t[rows].mean(0) if rows else t.new_zeros(t.shape[1]))
    return torch.stack(means), torch.tensor(ok)


def lara_head(x, y, v, q_bar, k_bar, ok, eps, real, mis):
    """The self-normalised MIS estimate for one head: x, y [N, D] scaled, ε [S, C, D] -> [N, Dv]."""
    mu = q_bar + k_bar
    S, Cn = eps.shape[:2]
    r = torch.softmax((x @ q_bar.T).masked_fill(~ok, -math.inf), -1)  # r_nc [N, C]
    total, weight = 0., 0.
    for s in range(S):
        for c in range(Cn):
            if not ok[c]:
                continue
            w = mu[c] + eps[s, c]
            xi_k = torch.exp(y @ w - y.square().sum(-1) / 2) * real  # ξ(k_m, ω) [N]
            target = normal_pdf(w, torch.zeros_like(w)) * torch.exp(x @ w - x.square().sum(-1) / 2) * xi_k.sum()
            densities = torch.stack([normal_pdf(w, mu[j]) for j in range(Cn)]) * ok
            alpha = densities[c] / densities.sum()
            if mis == 'opt':
                alpha = (alpha + r[:, c] - r.sum(-1) / ok.sum()).clamp_min(1e-8)  # [N]
            iw = alpha * target / densities[c]  # [N]
            total = total + iw[:, None] * ((xi_k @ v) / xi_k.sum())[None, :]
            weight = weight + iw
    return total / weight[:, None]


def reference(m, t, samples=1, mask=None, eval_mean=False):
    q, k, v = qkv(m, t)
    B = t.shape[0]
    Cn = m.segments(t.shape[1])
    eps = torch.zeros(1, H, 1, Cn, D, **F64) if eval_mean else \
        hash_normal(m.seed, [1, H, samples, Cn, D]).to(torch.float64)
    c = D ** -0.25
    out = torch.zeros_like(v)
    for b in range(B):
        real = torch.ones(t.shape[1], **F64) if mask is None else mask[b].to(torch.float64)
        for h in range(H):
            qh, kh = q[b, h], k[b, h]
            if m.proposal == 'adaptive':
                qh, kh = m.q_bar_gen(qh), m.k_bar_gen(kh)
            q_bar, ok = segment_means(qh * c, real > 0, Cn)
            k_bar, _ = segment_means(kh * c, real > 0, Cn)
            out[b, h] = lara_head(q[b, h] * c, k[b, h] * c, v[b, h] * real[:, None], q_bar, k_bar, ok, eps[0, h],
                                  real, m.mis)
    return out_proj(m, out)


@pytest.mark.parametrize('mis', ['opt', 'bh'])
def test_matches_the_estimator(mis):
    m = build('lara', C, H, num_landmarks=3, num_samples=2, mis=mis, sample_in_eval=True)
    x = torch.randn(1, N, C, **F64)
    assert_matches(m, x, lambda t: reference(m, t, samples=2))


def test_evaluation_samples_the_means_and_adaptive_proposals():
    m = build('lara', C, H, num_landmarks=3, proposal='adaptive')
    x = torch.randn(1, N, C, **F64)
    assert_matches(m, x, lambda t: reference(m, t, eval_mean=True))


def test_padding():
    m = build('lara', C, H, num_landmarks=4, sample_in_eval=True)
    x = torch.randn(2, N, C, **F64)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[0, 6:] = False  # segments 3 and 4 without a real token: no proposal there
    mask[1, [0, 5]] = False
    assert_matches(m, x, lambda t: reference(m, t, mask=mask), attn_mask=mask)


@pytest.mark.parametrize('mis', ['opt', 'bh'])
def test_converges_to_softmax_attention_as_samples_grow(mis):
    """Training draws fresh samples: averaged over seeds, the error to softmax attention falls with S (the
    self-normalised estimator is consistent; ~1/√S here)."""
    m = build('lara', C, H, num_landmarks=4, mis=mis).train()
    q, k, v = (0.5 * torch.randn(2, H, 32, D, **F64) for _ in range(3))
    exact = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), -1) @ v
    errors = []
    for samples in (1, 16, 256):
        m.num_samples = samples
        err = 0.
        for seed in range(4):
            torch.manual_seed(seed)
            with torch.no_grad():
                err += ((m.attend(q, k, v, None, None, False) - exact).abs().max() / exact.abs().max()).item() / 4
        errors.append(err)
    assert errors[1] < 0.75 * errors[0] and errors[2] < 0.5 * errors[1], errors


def test_training_draws_and_evaluation_is_deterministic():
    m = build('lara', C, H).train()
    x = torch.randn(1, N, C, **F64)
    with torch.no_grad():
        assert not torch.allclose(m(x), m(x))
        m.eval()
        torch.testing.assert_close(m(x), m(x), rtol=0, atol=0)
    assert m.segments(196) == 49 and m.segments(20) == 20 and m.segments(100) == 34


def test_bad_arguments():
    for kw in (dict(num_landmarks=0), dict(num_samples=0), dict(mis='x'), dict(proposal='x')):
        with pytest.raises(ValueError, match=next(iter(kw))):
            build('lara', C, H, **kw)
    with pytest.raises(ValueError, match='causal'):
        build('lara', C, H)(torch.randn(1, N, C, **F64), is_causal=True)
