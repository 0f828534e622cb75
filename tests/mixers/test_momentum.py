"""Momentum attention against the paper's heavy-ball recurrence run token by token in float64 (outputs and
gradients), causal and non-causal, the released parallel code's weights, chunk sizes, padding and arguments."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, build, out_proj, qkv  # noqa: E402

F64 = dict(dtype=torch.float64)
N, C, H = 11, 24, 3


def recurrence(q, k, v, mu, gamma, keep=None, eps=1e-6):
    """``P_i = μ P_{i-1} - γ φ(k_i) v_iᵀ``, ``S_i = S_{i-1} - P_i``, ``z_i = z_{i-1} + φ(k_i)`` for [B, H, N, D]
    inputs; returns every ``y_i = φ(q_i)ᵀ S_i / (φ(q_i)ᵀ z_i + eps)`` and the last state's read of every query."""
    fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    if keep is not None:  # padded tokens write nothing
        fk = fk * keep[:, None, :, None]
    P = fq.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])
    S, z = P.clone(), fq.new_zeros(*q.shape[:2], q.shape[-1])
    ys = []
    for i in range(q.shape[2]):
        P = mu * P - gamma * fk[:, :, i, :, None] * v[:, :, i, None, :]
        S, z = S - P, z + fk[:, :, i]
        ys.append((fq[:, :, i, :, None] * S).sum(-2) / ((fq[:, :, i] * z).sum(-1, keepdim=True) + eps))
    final = (fq @ S) / ((fq @ z[..., None]) + eps)
    return torch.stack(ys, 2), final


def final_weights_reference(q, k, v, mu, gamma, causal, eps=1e-6):
    """The released parallel code: key j scaled by ``γ (1 - μ^{N-j}) / (1 - μ)`` (0-based j), dense."""
    n = q.shape[2]
    fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    w = gamma * (1 - mu ** (n - torch.arange(n, **F64))) / (1 - mu)
    scores = fq @ fk.transpose(-2, -1)
    if causal:
        scores = scores.tril()
    return (scores * w) @ v / (scores.sum(-1, keepdim=True) + eps)


@pytest.mark.parametrize('causal', [False, True])
def test_matches_the_recurrence(causal):
    m = build('momentum', C, H, mu=0.7, stepsize=0.8, chunk_size=4)  # 3 chunks of 4
    x = torch.randn(2, N, C, **F64)

    def reference(t):
        ys, final = recurrence(*qkv(m, t), 0.7, 0.8)
        return out_proj(m, ys if causal else final)

    assert_matches(m, x, reference, is_causal=causal)


@pytest.mark.parametrize('causal', [False, True])
def test_final_weights_option(causal):
    m = build('momentum', C, H, mu=0.5, weights='final')
    x = torch.randn(2, N, C, **F64)
    assert_matches(m, x, lambda t: out_proj(m, final_weights_reference(*qkv(m, t), 0.5, 1., causal)),
                   is_causal=causal)


def test_chunk_size_does_not_change_the_function():
    x = torch.randn(2, 37, C, **F64)
    with torch.no_grad():
        outs = [build('momentum', C, H, mu=0.9, chunk_size=c)(x, is_causal=True) for c in (1, 5, 64)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-12, atol=1e-12)


def test_padded_tokens_write_nothing():
    m = build('momentum', C, H)
    x = torch.randn(2, N, C, **F64)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[0, 7:] = False
    mask[1, [1, 2, 6]] = False
    with torch.no_grad():
        for causal in (False, True):
            ys, final = recurrence(*qkv(m, x), 0.6, 1., keep=mask.to(torch.float64))
            want = out_proj(m, ys if causal else final)
            torch.testing.assert_close(m(x, attn_mask=mask, is_causal=causal)[mask], want[mask])


def test_bad_arguments():
    for kw in (dict(mu=1.), dict(mu=0.), dict(stepsize=0.), dict(weights='x'), dict(chunk_size=0)):
        with pytest.raises(ValueError, match=next(iter(kw))):
            build('momentum', C, H, **kw)
