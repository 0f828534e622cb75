"""UFO-ViT attention (``ufo``): a float64 reference from the paper's XNorm equations (with key padding),
External-Attention-pytorch's ``UFOAttention`` with the same weights (where installed), and its refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, build, out_proj, qkv  # noqa: E402

F64 = torch.float64


def _reference(m: torch.nn.Module, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per head: M = Σ_(real j) k_j v_jᵀ; out_i = Σ_c (γ q_ic / ‖q_i‖) (γ M_c / ‖M_c‖) over the rows M_c of M."""
    q, k, v = qkv(m, x)
    B, h, N, D = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        real = [j for j in range(N) if keep is None or keep[b, j]]
        for i in range(h):
            g = m.gamma[i]
            mem = sum((torch.outer(k[b, i, j], v[b, i, j]) for j in real), torch.zeros(D, D, dtype=x.dtype))
            rows = [g * mem[c] / mem[c].norm() if mem[c].norm() > 0 else mem[c] for c in range(D)]
            qn = g * q[b, i] / q[b, i].norm(dim=-1, keepdim=True)
            out[b, i] = sum(qn[:, c:c + 1] * rows[c] for c in range(D))
    return out_proj(m, out)


def test_matches_the_xnorm_equations_with_key_padding():
    m = build('ufo', 12, 3, qkv_bias=True)
    x = torch.randn(2, 11, 12, dtype=F64)
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[0, 6:] = False
    keep[1, 1:4] = False
    assert_matches(m, x, lambda t: _reference(m, t))
    assert_matches(m, x, lambda t: _reference(m, t, keep), attn_mask=keep)


def test_equals_external_attention_pytorch_ufo_attention():
    ufo = pytest.importorskip('fightingcv_attention.attention.UFOAttention')
    C, h = 12, 3
    ours = build('ufo', C, h, qkv_bias=True)
    theirs = ufo.UFOAttention(C, C // h, C // h, h).to(F64).eval()
    with torch.no_grad():
        for i, lin in enumerate((theirs.fc_q, theirs.fc_k, theirs.fc_v)):
            lin.weight.copy_(ours.qkv.weight[i * C:(i + 1) * C])
            lin.bias.copy_(ours.qkv.bias[i * C:(i + 1) * C])
        theirs.fc_o.weight.copy_(ours.proj.weight)
        theirs.fc_o.bias.copy_(ours.proj.bias)
        theirs.gamma.copy_(ours.gamma.reshape(1, h, 1, 1))
    x = torch.randn(2, 63, C, dtype=F64)
    torch.testing.assert_close(ours(x), theirs(x, x, x), rtol=1e-10, atol=1e-10)


def test_gamma_scales_both_xnorms_and_no_real_token_gives_the_bias():
    m = visattn.create_mixer('ufo', 8, num_heads=2, dtype=F64).eval()
    assert m.gamma.shape == (2,) and torch.equal(m.gamma, torch.ones(2, dtype=F64))
    x = torch.randn(1, 5, 8, dtype=F64)
    out = m(x, attn_mask=torch.zeros(1, 5, dtype=torch.bool))
    torch.testing.assert_close(out, m.proj.bias.expand_as(out))
    before = m(x) - m.proj.bias
    with torch.no_grad():
        m.gamma.fill_(3.)
    torch.testing.assert_close(m(x) - m.proj.bias, 9 * before)  # γ in XNorm(Q) and in XNorm(KᵀV)
