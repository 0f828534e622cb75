"""HyperMixer: the paper's equations in float64 written token by token (outputs and gradients, every option), any
length, exact key padding, errors."""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import visattn
from visattn.mixers import HyperMixer

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, build  # noqa: E402


def _positions(n: int, c: int) -> torch.Tensor:
    p = torch.zeros(n, c, dtype=torch.float64)
    for t in range(n):
        for i in range(0, c, 2):
            p[t, i] = math.sin(t / 10000 ** (i / c))
            if i + 1 < c:
                p[t, i + 1] = math.cos(t / 10000 ** (i / c))
    return p


def _hyper(net, head: int, u: torch.Tensor) -> torch.Tensor:
    """One token's row of W for one head: ``fc2 GELU(fc1 u + b1) + b2``."""
    h = net.fc1_weight[head] @ u
    if net.fc1_bias is not None:
        h = h + net.fc1_bias[head]
    out = net.fc2_weight[head] @ F.gelu(h)
    return out if net.fc2_bias is None else out + net.fc2_bias[head]


def _reference(x: torch.Tensor, m: HyperMixer, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``W_k[n] = h_k(x_n + p_n)`` row by row, ``Y = W2 GELU(W1ᵀ X)`` per head, then LayerNorm; hidden tokens send
    and receive nothing."""
    B, N, C = x.shape
    H, D = m.num_heads, C // m.num_heads
    scale = math.sqrt(C) if m.input_scale != 1. else 1.
    keep = torch.ones(N, dtype=torch.bool) if keep is None else keep
    pos = _positions(N, C)
    outs = []
    for b in range(B):
        heads = []
        for h in range(H):
            sl = slice(h * D, (h + 1) * D)
            rows1, rows2 = [], []
            for n in range(N):
                u = x[b, n, sl] * scale + pos[n, sl]
                w1 = _hyper(m.hyper_w1, h, u)
                w2 = w1 if m.hyper_w2 is None else _hyper(m.hyper_w2, h, u)
                rows1.append(w1 * keep[n])
                rows2.append(w2 * keep[n])
            w1, w2 = torch.stack(rows1), torch.stack(rows2)  # [N, d'/H]
            v = x[b, :, sl] * keep[:, None]
            heads.append(w2 @ F.gelu(w1.T @ v))
        outs.append(torch.cat(heads, dim=-1))
    out = torch.stack(outs)
    if isinstance(m.out_norm, torch.nn.LayerNorm):
        out = F.layer_norm(out, (C,), m.out_norm.weight, m.out_norm.bias, 1e-5)
    return out


@pytest.mark.parametrize('kw', [
    {},
    dict(tied=True, hyper_bias=True, out_norm=False, scale_input=True, hidden_features=18),
])
def test_matches_the_paper_equations_float64(kw):
    m = build('hypermixer', 12, 2, seed=42, **kw)
    assert_matches(m, torch.randn(2, 13, 12, dtype=torch.float64), lambda t: _reference(t, m))


def test_padding_is_exact_and_any_length_works():
    m = build('hypermixer', 12, 3, seed=42)
    x = torch.randn(1, 11, 12, dtype=torch.float64)
    keep = torch.tensor([True, True, False, True, True, True, False, True, True, False, False])
    assert_matches(m, x, lambda t: _reference(t, m, keep), attn_mask=keep[None])
    # trailing padding is the shorter input (positions unchanged); and no length is fixed
    torch.testing.assert_close(m(x, attn_mask=keep[None])[:, :9][:, keep[:9]], m(x[:, :9], attn_mask=keep[None, :9])
                               [:, keep[:9]], rtol=0, atol=1e-12)
    assert m(torch.randn(2, 63, 12, dtype=torch.float64)).shape == (2, 63, 12)


def test_positions_break_the_permutation_symmetry():
    """The hypernetworks see ``x_n + p_n``: permuting the tokens does not just permute the output."""
    torch.manual_seed(42)
    m = HyperMixer(12, num_heads=2, dtype=torch.float64)
    x = torch.randn(1, 9, 12, dtype=torch.float64)
    perm = torch.randperm(9)
    assert not torch.allclose(m(x[:, perm]), m(x)[:, perm], atol=1e-6)


def test_arguments_and_errors():
    m = visattn.create_mixer('hypermixer', 32, num_heads=4)
    assert m.hidden_features == 128 and m.hyper_w1.fc2_weight.shape == (4, 32, 8) and m.hyper_w2 is not None
    assert visattn.create_mixer('hypermixer', 32, num_heads=4, tied=True).hyper_w2 is None
    with pytest.raises(ValueError, match='causal'):
        m(torch.randn(1, 5, 32), is_causal=True)
    with pytest.raises(ValueError, match='hidden_features'):
        visattn.create_mixer('hypermixer', 32, num_heads=4, hidden_features=30)
