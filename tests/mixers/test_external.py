"""External attention in token form (``external``): a float64 reference from the paper's multi-head equations
(double normalisation, memories shared by the heads, key padding, the EAMLP expansion), External-Attention-pytorch's
single-head ``ExternalAttention`` with the same memories (where installed), and the initialisation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, build, linear, split  # noqa: E402

F64 = torch.float64


def _reference(m: torch.nn.Module, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per head h: A = F_h M_kᵀ [N, S]; α_ns = exp(A_ns) / Σ_(real n') exp(A_n's); α_ns ← α_ns / Σ_s' α_ns';
    out = Concat_h(α M_vᵀ) W_o."""
    params = dict(m.named_parameters())
    feats = split(linear(x, params, 'q'), m.heads)  # [B, eH, N, D]
    logits = feats @ m.mk.weight.T  # [B, eH, N, S]
    real = torch.ones(x.shape[:2], dtype=torch.bool) if keep is None else keep
    e = torch.exp(logits) * real[:, None, :, None]
    alpha = e / e.sum(2, keepdim=True).clamp_min(1e-300)
    alpha = alpha / (1e-9 + alpha.sum(3, keepdim=True))
    out = alpha @ m.mv.weight.T  # [B, eH, N, D]
    B, h, N, D = out.shape
    return linear(out.transpose(1, 2).reshape(B, N, h * D), params, 'proj')


@pytest.mark.parametrize('expansion', [1, 2])
def test_matches_the_multi_head_equations_with_key_padding(expansion):
    m = build('external', 12, 3, num_slots=5, expansion=expansion, qkv_bias=True)
    assert m.q.weight.shape == (12 * expansion, 12) and m.mk.weight.shape == (5, 4) and m.heads == 3 * expansion
    x = torch.randn(2, 13, 12, dtype=F64)
    keep = torch.ones(2, 13, dtype=torch.bool)
    keep[0, 8:] = False
    keep[1, ::3] = False
    assert_matches(m, x, lambda t: _reference(m, t))
    assert_matches(m, x, lambda t: _reference(m, t, keep), attn_mask=keep)


def test_equals_external_attention_pytorch_with_identity_projections():
    """One head, ``q`` and ``proj`` the identity: the paper's single-head unit. External-Attention-pytorch divides by
    the slot sum without the released code's 1e-9 (kept here), so the two agree to ~1e-9 relative, not exactly."""
    ea = pytest.importorskip('fightingcv_attention.attention.ExternalAttention')
    ours = visattn.create_mixer('external', 10, num_heads=1, num_slots=6, dtype=F64).eval()
    theirs = ea.ExternalAttention(10, S=6).to(F64).eval()
    with torch.no_grad():
        ours.q.weight.copy_(torch.eye(10))
        ours.proj.weight.copy_(torch.eye(10))
        ours.proj.bias.zero_()
        theirs.mk.weight.copy_(ours.mk.weight)
        theirs.mv.weight.copy_(ours.mv.weight)
    x = torch.randn(2, 63, 10, dtype=F64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-7, atol=1e-10)


def test_memories_start_as_transposes_and_no_real_token_gives_the_bias():
    m = visattn.create_mixer('external', 16, num_heads=2, num_slots=64, dtype=F64).eval()
    torch.testing.assert_close(m.mk.weight, m.mv.weight.T)
    assert abs(m.mv.weight.std().item() - (2 / 8) ** 0.5) < 0.1  # N(0, 2/D), D = 8
    x = torch.randn(1, 5, 16, dtype=F64)
    out = m(x, attn_mask=torch.zeros(1, 5, dtype=torch.bool))
    torch.testing.assert_close(out, m.proj.bias.expand_as(out))
