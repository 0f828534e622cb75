"""Skyformer against the Nyström approximation written from the paper (the Gaussian kernel of the sampled rows of
[Q; K], the pseudo-inverse of the landmarks' kernel by the Newton iteration or exactly), outputs and gradients,
padding; its convergence to exact Gaussian-kernel attention as the landmarks grow to all 2N rows; the sampling."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, build, out_proj, qkv  # noqa: E402

F64 = dict(dtype=torch.float64)
N, C, H = 11, 24, 3
D = C // H


def kappa(a, b):
    """``exp(-|a_i - b_j|²/2)`` from the squared distances."""
    return torch.exp(-(a[:, None, :] - b[None, :, :]).square().sum(-1) / 2)


def newton_pinv(a, iterations):
    """``Z ← ¼ Z (13I − AZ(15I − AZ(7I − AZ)))`` from ``Z0 = Aᵀ / (‖A‖₁ ‖A‖∞)``."""
    eye = torch.eye(a.shape[0], **F64)
    z = a.T / (torch.linalg.matrix_norm(a, 1) * torch.linalg.matrix_norm(a, math.inf))
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def reference(m, t, mask=None):
    """κ(Q, X_S) W⁺ κ(X_S, K) V per head, with W = κ(X_S, X_S) + λI; W⁺ by the paper's iteration on the row-sum
    normalised W (undone after), or exactly."""
    q, k, v = qkv(m, t)
    B = t.shape[0]
    valid = torch.ones(B, t.shape[1], dtype=torch.bool) if mask is None else mask
    idx = m.landmarks(valid)
    c = D ** -0.25
    out = torch.zeros_like(v)
    for b in range(B):
        keep = valid[b].to(torch.float64)
        for h in range(H):
            x, y = q[b, h] * c, k[b, h] * c
            marks = torch.cat([x, y])[idx[b]]
            w = kappa(marks, marks)
            if m.ridge is not None:
                w = w + m.ridge * torch.eye(w.shape[0], **F64)
            if m.pinv_iterations is None:
                inv = torch.linalg.pinv(w)
            else:
                s = torch.diag(w.sum(-1) ** -0.5)
                inv = s @ newton_pinv(s @ w @ s, m.pinv_iterations) @ s
            out[b, h] = kappa(x, marks) @ inv @ (kappa(y, marks) * keep[:, None]).T @ v[b, h]
    return out_proj(m, out)


@pytest.mark.parametrize('iterations', [6, None])
def test_matches_the_nystrom_approximation(iterations):
    m = build('skyformer', C, H, num_landmarks=7, pinv_iterations=iterations)
    x = torch.randn(2, N, C, **F64)
    assert_matches(m, x, lambda t: reference(m, t), tol=1e-9)


def test_padding():
    m = build('skyformer', C, H, num_landmarks=8, replacement=False)
    x = torch.randn(2, N, C, **F64)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[0, 7:] = False
    mask[1, [0, 3]] = False
    idx = m.landmarks(mask)
    for b in range(2):
        assert mask[b][idx[b, :4]].all() and (idx[b, :4] < N).all()  # query rows, real tokens
        assert mask[b][idx[b, 4:] - N].all() and (idx[b, 4:] >= N).all()  # then key rows
    assert_matches(m, x, lambda t: reference(m, t, mask), tol=1e-9, attn_mask=mask)


def test_converges_to_gaussian_kernel_attention():
    """Without the ridge, with the exact pseudo-inverse and distinct rows, the error to ``κ(Q, K) V`` (the paper's
    kernelized attention) falls as the landmarks grow and vanishes when they are all 2N rows."""
    x = torch.randn(1, N, C, **F64)
    errors = []
    for d in (4, 10, 16, 2 * N):
        m = build('skyformer', C, H, num_landmarks=d, ridge=None, pinv_iterations=None, replacement=False)
        q, k, v = qkv(m, x)
        c = D ** -0.25
        exact = torch.exp(-(q[:, :, :, None] * c - k[:, :, None] * c).square().sum(-1) / 2) @ v
        with torch.no_grad():
            got = m.attend(q, k, v, None, None, False)
        errors.append(((got - exact).norm() / exact.norm()).item())
    assert errors[0] > errors[1] > errors[2] > 1e3 * errors[3], errors
    assert errors[3] < 1e-7, errors


def test_landmarks_with_and_without_replacement():
    valid = torch.ones(2, 5, dtype=torch.bool)
    m = build('skyformer', C, H, num_landmarks=10, replacement=False)
    idx = m.landmarks(valid)
    assert sorted(idx[0].tolist()) == list(range(10))  # all 2N rows once
    m = build('skyformer', C, H, num_landmarks=64)
    assert m.landmarks(valid).shape == (2, 10)  # at most 2N
    assert build('skyformer', C, H, seed=1).landmarks(valid).tolist() == \
        build('skyformer', C, H, seed=1).landmarks(valid).tolist()
    m = build('skyformer', C, H, resample_each_forward=True).train()
    valid = torch.ones(1, 64, dtype=torch.bool)
    assert not torch.equal(m.landmarks(valid), m.landmarks(valid))


def test_bad_arguments():
    for kw in (dict(num_landmarks=1), dict(ridge=0.), dict(pinv_iterations=0)):
        with pytest.raises(ValueError, match=next(iter(kw))):
            build('skyformer', C, H, **kw)
    with pytest.raises(ValueError, match='causal'):
        build('skyformer', C, H)(torch.randn(1, N, C, **F64), is_causal=True)
