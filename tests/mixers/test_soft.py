"""SOFT (``soft``) against a float64 reference written from the paper's equations: landmarks by the strided
convolution (as sums over the cells) or by cell means, the Gaussian kernels, the Newton-Schulz iterate written as a
function of A's eigenvalues, the released code's value convolution, key padding; convergence to the exact
Gaussian-kernel attention ``S V`` as the landmarks reach every token; options and refusals."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import visattn
from visattn.mixers.soft import newton_inverse

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, build, linear, split  # noqa: E402

F64 = torch.float64


def _newton_by_eigenvalues(a: torch.Tensor, iterations: int) -> torch.Tensor:
    """The Newton-Schulz iterate from ``α a`` is a polynomial in the symmetric ``a``: on each eigenvalue λ,
    ``z ← 2z - λ z²`` from ``z = αλ``, α = 1.8 / max row sum²."""
    lam, vec = torch.linalg.eigh(a)
    z = lam * 1.8 / a.abs().sum(-1).amax(-1, keepdim=True) ** 2
    for _ in range(iterations):
        z = 2 * z - lam * z * z
    return vec @ torch.diag_embed(z) @ vec.transpose(-2, -1)


def _kernel(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """exp(-‖a_i - b_j‖² / (2√D)) from the differences."""
    return torch.exp(-(a[..., :, None, :] - b[..., None, :, :]).square().sum(-1) / (2 * math.sqrt(dim)))


def _landmarks(m: torch.nn.Module, q: torch.Tensor, keep: torch.Tensor | None, H: int, W: int) -> torch.Tensor:
    """Landmarks of the patch queries q [B, h, H·W, D] (unscaled): per s×s cell of the zero-padded grid, the
    convolution as a sum of weight-times-query over the cell, then LayerNorm and GELU; or the mean of the cell's
    real queries."""
    s, D = m.landmark_stride, q.shape[-1]
    grid = q * (1. if keep is None else keep[:, None, :, None]) / D ** 0.25  # the kernel's scaled queries
    if m.landmark_grid is None:
        rows = [range(y0, min(y0 + s, H)) for y0 in range(0, H, s)]
        cols = [range(x0, min(x0 + s, W)) for x0 in range(0, W, s)]
    else:  # adaptive cells: rows floor(i·H/g) .. ceil((i+1)·H/g) - 1
        gh, gw = m.landmark_grid
        rows = [range(i * H // gh, -(-(i + 1) * H // gh)) for i in range(gh)]
        cols = [range(j * W // gw, -(-(j + 1) * W // gw)) for j in range(gw)]
    cells = []
    for ry in rows:
        for rx in cols:
            y0, x0 = ry[0], rx[0]
            idx = [y * W + x for y in ry for x in rx]
            if m.landmarks == 'conv':
                taps = [m.landmark_conv.weight[:, :, y - y0, x - x0] for y in ry for x in rx]
                cells.append(sum(grid[:, :, i] @ t.T for i, t in zip(idx, taps)))
            else:
                n = len(idx) if keep is None else keep[:, idx].sum(-1).clamp_min(1)[:, None, None]
                cells.append(grid[:, :, idx].sum(2) / n if keep is not None else grid[:, :, idx].mean(2))
    lm = torch.stack(cells, 2)
    if m.landmarks == 'conv':
        lm = F.gelu(F.layer_norm(lm, (D,), m.landmark_norm.weight, m.landmark_norm.bias))
    return lm * D ** 0.25  # back to the queries' scale, for ``_kernel``


def _reference(m, x, H, W, keep=None, exact=False):
    params = dict(m.named_parameters())
    B, N, C = x.shape
    P, h, D = m.num_prefix_tokens, m.num_heads, m.head_dim
    q, v = split(linear(x, params, 'qv', slice(0, C)), h), split(linear(x, params, 'qv', slice(C, 2 * C)), h)
    lm = _landmarks(m, q[:, :, P:], None if keep is None else keep[:, P:], H, W)
    p = _kernel(q, lm, D)  # [B, h, N, m]
    a = _kernel(lm, lm, D)
    a_inv = torch.linalg.pinv(a) if exact else _newton_by_eigenvalues(a, m.newton_iters)
    vk = v if keep is None else v * keep[:, None, :, None]
    out = p @ a_inv @ p.transpose(-2, -1) @ vk
    if m.value_conv is not None:
        k = m.value_conv.kernel_size[0]
        grid = vk[:, :, P:].reshape(B, h, H, W, D)
        padded = F.pad(grid, (0, 0, k // 2, k // 2, k // 2, k // 2))
        local = sum(m.value_conv.weight[:, 0, i, j][None, :, None, None, None] * padded[:, :, i:i + H, j:j + W]
                    for i in range(k) for j in range(k))
        out = out + F.pad(local.reshape(B, h, H * W, D), (0, 0, P, 0))
    return linear(out.transpose(1, 2).reshape(B, N, C), params, 'proj')


def _check_with_and_without_padding(m, H, W, P):
    x = torch.randn(2, P + H * W, 12, dtype=F64)
    keep = torch.ones(2, P + H * W, dtype=torch.bool)
    keep[0, 20:] = False
    keep[1, :4] = False
    assert_matches(m, x, lambda t: _reference(m, t, H, W), tol=1e-9)
    assert_matches(m, x, lambda t: _reference(m, t, H, W, keep), tol=1e-9, attn_mask=keep)


@pytest.mark.parametrize('landmarks', ['conv', 'pool'])
def test_matches_the_equations_with_key_padding(landmarks):
    H, W, P = 5, 7, 1  # 3x4 landmarks from a zero-padded 6x8 grid
    m = build('soft', 12, 2, feat_size=(H, W), num_prefix_tokens=P, landmarks=landmarks, value_conv=3,
              qkv_bias=True)
    _check_with_and_without_padding(m, H, W, P)


def test_fixed_landmark_grid_matches_the_equations_and_keeps_m_fixed():
    """``landmark_grid``: the means of the real queries of adaptive cells (uneven on 5×7 into 3×2, overlapping
    rows where the cells do not divide the grid), with key padding; m stays g_h·g_w at a larger grid."""
    H, W, P = 5, 7, 1
    m = build('soft', 12, 2, feat_size=(H, W), num_prefix_tokens=P, landmarks='pool', landmark_grid=(3, 2))
    _check_with_and_without_padding(m, H, W, P)
    q = torch.randn(1, 2, 28 * 28, 6, dtype=F64)
    assert m.sample_landmarks(q, None, 28, 28).shape == (1, 2, 6, 6)
    assert m.sample_landmarks(q[:, :, :4], None, 2, 2).shape == (1, 2, 4, 6)  # at most one cell per token


def test_converges_to_exact_gaussian_kernel_attention_as_landmarks_reach_every_token():
    """``'pool'`` landmarks of s×s cells, no prefix token: the error to ``S V`` (S the Gaussian kernel of all the
    queries) falls as s shrinks (0.3, 0.13 here) and vanishes at s = 1, where every token is a landmark; 40 Newton
    steps reach the pseudo-inverse (A's smallest eigenvalue is ~2e-3 here)."""
    H, W, C = 6, 6, 16
    x = torch.randn(1, H * W, C, dtype=F64) * 0.3
    errors = []
    for s in (3, 2, 1):
        m = build('soft', C, 2, feat_size=(H, W), num_prefix_tokens=0, landmarks='pool', landmark_stride=s,
                  newton_iters=40)
        params = dict(m.named_parameters())
        q, v = split(linear(x, params, 'qv', slice(0, C)), 2), split(linear(x, params, 'qv', slice(C, 2 * C)), 2)
        exact = linear((_kernel(q, q, C // 2) @ v).transpose(1, 2).reshape(1, H * W, C), params, 'proj')
        got = m(x)
        torch.testing.assert_close(got, _reference(m, x, H, W, exact=True), rtol=1e-6, atol=1e-6)
        errors.append(((got - exact).norm() / (exact - m.proj.bias).norm()).item())
    assert errors[0] > errors[1] > 1e-9 > errors[2], errors


def test_newton_inverse_approaches_the_inverse():
    """The error ``‖V_k A - I‖`` falls with the steps (slowly while α λ_min² is small, then quadratically)."""
    pts = torch.randn(9, 4, dtype=F64) * 0.5
    a = _kernel(pts, pts, 4) ** 2  # exp(-‖Δ‖²/2): the mixer's kernel of q / D^¼
    errs = [(newton_inverse(a, n) @ a - torch.eye(9, dtype=F64)).abs().max().item() for n in (4, 12, 20, 40)]
    assert errs[0] > errs[1] > errs[2] > 1e-3 > 1e-10 > errs[3], errs


def test_options_and_refusals():
    with pytest.raises(ValueError, match='landmarks'):
        visattn.create_mixer('soft', 8, num_heads=2, feat_size=4, landmarks='random')
    with pytest.raises(ValueError, match='value_conv'):
        visattn.create_mixer('soft', 8, num_heads=2, feat_size=4, value_conv=2)
    with pytest.raises(ValueError, match='landmark_grid'):
        visattn.create_mixer('soft', 8, num_heads=2, feat_size=4, landmark_grid=7)
    with pytest.raises(ValueError, match='landmark_grid'):
        visattn.create_mixer('soft', 8, num_heads=2, feat_size=4, landmarks='pool', landmark_grid=(7, 0))
    m = visattn.create_mixer('soft', 8, num_heads=2, feat_size=4, landmarks='pool')
    assert m.landmark_conv is None and m.landmark_norm is None and m.value_conv is None and m.qkv is None
    with pytest.raises(ValueError, match='causal'):
        m(torch.randn(1, 17, 8), is_causal=True)
