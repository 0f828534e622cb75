"""Flowformer against dense float64 flow matrices written from the paper's equations (outputs and gradients),
causal and padded forms, and the released code's clamp option."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, build, out_proj, qkv  # noqa: E402

F64 = dict(dtype=torch.float64)
N, C, H = 11, 24, 3


def flow_reference(q, k, v, causal=False, clamp=None, eps=1e-6):
    """Flow-Attention from the dense matrix ``A_ij = φ(q_i)·φ(k_j)`` of one head: [N, D] -> [N, Dv].

    Non-causal: I = row sums, O = column sums, Î_i = Σ_j A_ij / O_j, Ô_j = Σ_i A_ij / I_i. Causal: the same sums
    restricted to j <= i (rows) and i <= j (columns), weighted by the counts n = 1..N as the paper's causal form."""
    n = q.shape[0]
    A = torch.sigmoid(q) @ torch.sigmoid(k).T
    if not causal:
        incoming, outgoing = A.sum(1), A.sum(0)
        sink = (A / outgoing[None, :]).sum(1)
        source = (A / incoming[:, None]).sum(0)
        if clamp is not None:
            source = source.clamp(-clamp, clamp)
        competition = torch.softmax(source, 0) * n
        return torch.sigmoid(sink)[:, None] * (A @ (v * competition[:, None])) / (incoming + eps)[:, None]
    low = torch.ones(n, n, **F64).tril()  # j <= i
    count = torch.arange(1, n + 1, **F64)
    incoming = (A * low).sum(1)  # Σ_{j<=i} A_ij
    outgoing = (A * low.T).sum(0)  # O_j = Σ_{i<=j} A_ij
    sink = (A * low * (count / outgoing)[None, :]).sum(1) / count
    source = (A * low.T * (count / incoming)[:, None]).sum(0) / count
    if clamp is not None:
        source = source.clamp(-clamp, clamp)
    e = torch.exp(source)
    competition = e / torch.cumsum(e, 0) * count
    return torch.sigmoid(sink)[:, None] * ((A * low) @ (v * competition[:, None])) / (incoming + eps)[:, None]


def module_reference(m, x, causal=False, clamp=None):
    q, k, v = qkv(m, x)
    B, H = q.shape[:2]
    out = torch.stack([torch.stack([flow_reference(q[b, h], k[b, h], v[b, h], causal, clamp) for h in range(H)])
                       for b in range(B)])
    return out_proj(m, out)


@pytest.mark.parametrize('causal', [False, True])
def test_matches_the_flow_equations(causal):
    m = build('flowformer', C, H)
    x = torch.randn(2, N, C, **F64)
    assert_matches(m, x, lambda t: module_reference(m, t, causal), is_causal=causal)


def test_source_clamp_option():
    m = build('flowformer', C, H, source_clamp=1.)
    x = torch.randn(2, N, C, **F64)
    q, k, _ = qkv(m, x)
    A = torch.sigmoid(q) @ torch.sigmoid(k).transpose(-2, -1)
    assert ((A / A.sum(-1, keepdim=True)).sum(-2) > 1).any()  # the clamp acts
    assert_matches(m, x, lambda t: module_reference(m, t, clamp=1.))
    assert_matches(m, x, lambda t: module_reference(m, t, True, 1.), is_causal=True)


@pytest.mark.parametrize('causal', [False, True])
def test_padding_is_exact(causal):
    """A padded sequence's real outputs are those of the sequence without its padded tokens (N and the position
    counts count the real tokens)."""
    m = build('flowformer', C, H)
    x = torch.randn(2, N, C, **F64)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[0, 8:] = False
    mask[1, [0, 4, 5]] = False
    with torch.no_grad():
        out = m(x, attn_mask=mask, is_causal=causal)
        for row in range(2):
            alone = m(x[row:row + 1, mask[row]], is_causal=causal)[0]
            torch.testing.assert_close(out[row, mask[row]], alone, rtol=1e-10, atol=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match='source_clamp'):
        build('flowformer', C, H, source_clamp=0.)
    with pytest.raises(ValueError, match='mask'):
        build('flowformer', C, H)(torch.randn(1, N, C, **F64), attn_mask=torch.zeros(1, 1, N, N, **F64))
