"""Average attention (``aan``) against a float64 reference written from the paper's equations, position by position
(the average of the visible tokens at or before j, or of all visible tokens for our non-causal form; the FFN; the
input and forget gates), outputs and every gradient, for the options; hidden tokens as removal; rows without a
visible token average to 0. OpenNMT-py's ``AverageAttention`` is not installed here (and its FFN carries its own
LayerNorm and residual), so there is no library comparison."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, build, linear  # noqa: E402

F64 = dict(dtype=torch.float64)
C = 12


def reference(m, x, causal, keep=None, use_ffn=True, out_proj=True):
    p = dict(m.named_parameters())
    B, N, _ = x.shape
    visible = torch.ones(B, N, dtype=torch.bool) if keep is None else keep
    rows = []
    for b in range(B):
        for j in range(N):
            seen = [i for i in range(N if not causal else j + 1) if visible[b, i]]
            avg = sum((x[b, i] for i in seen), x.new_zeros(C)) / max(len(seen), 1)
            g = linear(torch.relu(linear(avg, p, 'fc1')), p, 'fc2') if use_ffn else avg
            z = linear(torch.cat([x[b, j], g]), p, 'gate')
            h = torch.sigmoid(z[:C]) * x[b, j] + torch.sigmoid(z[C:]) * g
            rows.append(linear(h, p, 'proj') if out_proj else h)
    return torch.stack(rows).reshape(B, N, C)


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('kw', [{}, {'use_ffn': False, 'out_proj': False}, {'ffn_hidden': 4 * C}])
def test_matches_the_paper_equations_with_key_padding(causal, kw):
    m = build('aan', C, 3, seed=42, **kw)
    x = torch.randn(2, 9, C, **F64)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, :2] = False  # causal rows 0 and 1 see no visible token: their average is 0
    keep[1, [3, 4, 8]] = False
    opts = dict(use_ffn=kw.get('use_ffn', True), out_proj=kw.get('out_proj', True))
    assert_matches(m, x, lambda t: reference(m, t, causal, **opts), is_causal=causal)
    assert_matches(m, x, lambda t: reference(m, t, causal, keep, **opts), is_causal=causal, attn_mask=keep)


@pytest.mark.parametrize('causal', [False, True])
def test_hidden_tokens_are_as_if_removed(causal):
    m = build('aan', C, 3, seed=42)
    x = torch.randn(1, 63, C, **F64)
    keep = torch.rand(1, 63) > 0.3
    with torch.no_grad():
        out = m(x, attn_mask=keep, is_causal=causal)
        torch.testing.assert_close(out[keep], m(x[:, keep[0]], is_causal=causal)[0], rtol=1e-12, atol=1e-12)
        hidden = m(x, attn_mask=torch.zeros(1, 63, dtype=torch.bool), is_causal=causal)
        zero_avg = m.fc2(m.act(m.fc1(torch.zeros(C, **F64))))
        i, f = m.gate(torch.cat([x[0], zero_avg.expand(63, C)], -1)).chunk(2, -1)
        expected = m.proj(torch.sigmoid(i) * x[0] + torch.sigmoid(f) * zero_avg)
    torch.testing.assert_close(hidden[0], expected, rtol=1e-12, atol=1e-12)


def test_parameters():
    m = visattn.create_mixer('aan', 32, num_heads=4)
    assert m.qkv is None and m.gate.weight.shape == (64, 64) and m.fc1.weight.shape == (32, 32)
    assert {n for n, _ in m.named_parameters()} == {
        'fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias', 'gate.weight', 'gate.bias', 'proj.weight', 'proj.bias'}
    bare = visattn.create_mixer('aan', 32, num_heads=4, use_ffn=False, out_proj=False)
    assert {n for n, _ in bare.named_parameters()} == {'gate.weight', 'gate.bias'}
