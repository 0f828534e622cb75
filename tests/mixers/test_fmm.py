"""FMMformer against a dense float64 reference written from the paper's ``(w_1 D + w_2 L) V``: the banded softmax D
over ``|i - j| < k`` and the normalised kernel terms ``φ_l(Q) φ_l(K)ᵀ`` (elu(x)+1, elu(-x)+1, tanh(x)+1) built as
N×N matrices, outputs and gradients, padded and causal, with the features normalised (released code) or not; the
band converges to softmax attention as k reaches N."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, build, out_proj, qkv  # noqa: E402

N, C, H = 37, 30, 2
FEATURES = (lambda t: F.elu(t) + 1, lambda t: F.elu(-t) + 1, lambda t: torch.tanh(t) + 1)


def reference(m, x, kpm=None, causal=False):
    q, k, v = qkv(m, x)
    n = x.shape[1]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    keep = torch.ones(x.shape[0], 1, 1, n, dtype=torch.bool) if kpm is None else kpm[:, None, None, :]
    if causal:
        keep = keep & (j <= i)
    band = keep & ((i - j).abs() < m.bandwidth)
    s = (q @ k.transpose(-1, -2) * m.scale).masked_fill(~band, -torch.inf)
    out = m.near_weight * (torch.softmax(s, -1).nan_to_num(0.) @ v)
    for index in range(m.kernels):
        fq, fk = FEATURES[index](q), FEATURES[index](k)
        if m.normalize_features:
            fq, fk = fq / fq.sum(-1, keepdim=True), fk / fk.sum(-1, keepdim=True)
        a = (fq @ fk.transpose(-1, -2)) * keep
        out = out + m.far_weight[index] * (a @ v) / (a.sum(-1, keepdim=True) + m.eps)
    return out_proj(m, out)


@pytest.mark.parametrize('bandwidth,kernels,normalize,causal', [(3, 2, False, False), (5, 3, True, False),
                                                                (4, 3, False, True)])
def test_matches_near_plus_far_field(bandwidth, kernels, normalize, causal):
    m = build('fmm', C, H, bandwidth=bandwidth, kernels=kernels, normalize_features=normalize)
    x = torch.randn(2, N, C, dtype=torch.float64)
    kpm = torch.rand(2, N) > 0.3
    kpm[1, :12] = False
    assert_matches(m, x, lambda t: reference(m, t, causal=causal), is_causal=causal)
    assert_matches(m, x, lambda t: reference(m, t, kpm, causal=causal), attn_mask=kpm, is_causal=causal)


def test_initialisation_is_the_released_codes():
    m = visattn.create_mixer('fmm', C, num_heads=H, kernels=3)
    assert torch.equal(m.near_weight, torch.zeros(H, 1, C // H))
    assert torch.equal(m.far_weight, torch.full((3, H, 1, C // H), 1 / 3))


@pytest.mark.parametrize('causal', [False, True])
def test_band_converges_to_softmax_attention(causal):
    exact = build('full', C, H)
    x = torch.randn(2, N, C, dtype=torch.float64)
    errors = []
    for bandwidth in (2, 10, N):
        m = build('fmm', C, H, bandwidth=bandwidth, kernels=1)
        m.load_state_dict({**exact.state_dict(), 'near_weight': torch.ones_like(m.near_weight),
                           'far_weight': torch.zeros_like(m.far_weight)})
        errors.append((m(x, is_causal=causal) - exact(x, is_causal=causal)).abs().max().item())
    assert errors[0] > errors[1] > 1e-6 and errors[2] < 1e-10


def test_arguments():
    for value in (0, 4):
        with pytest.raises(ValueError, match='kernels'):
            visattn.create_mixer('fmm', C, num_heads=H, kernels=value)
    with pytest.raises(ValueError, match='bandwidth'):
        visattn.create_mixer('fmm', C, num_heads=H, bandwidth=0)
