"""Persistent-memory attention (``persistent``) against a float64 reference written from the paper's equations (one
softmax per head over the token keys and the √D-scaled slot keys, values with the √S-scaled slot values), head by
head with the hidden token keys dropped, outputs and every gradient, under key padding, causality and a float
mask; the contract for rows whose token keys are all hidden (they attend to the slots alone); timm's
``Attention`` with the same weights through an exact identity; the released code's initialisation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, build, linear  # noqa: E402

F64 = dict(dtype=torch.float64)
C, H, S = 12, 3, 5


def reference(m, x, allowed=None, bias=None):
    """``allowed`` [B, N, N] bool (query, token key) or None; ``bias`` [N, N] float added to the token scores. Per
    head, dense: the [N, N] token scores (-inf where hidden) beside the [N, S] slot scores, one softmax."""
    p = dict(m.named_parameters())
    d = C // H
    q, k, v = (linear(x, p, 'qkv', slice(i * C, (i + 1) * C)) for i in range(3))
    heads = []
    for h in range(H):
        sl = slice(h * d, (h + 1) * d)
        qh, kh = m.q_norm(q[..., sl]), m.k_norm(k[..., sl])
        tokens = qh @ kh.transpose(1, 2) / d ** 0.5  # [B, N, N]
        if bias is not None:
            tokens = tokens + bias
        if allowed is not None:
            tokens = tokens.masked_fill(~allowed, float('-inf'))
        slots = qh @ (p['mem_k'][h] * d ** 0.5).T / d ** 0.5  # [B, N, S]
        w = torch.softmax(torch.cat([tokens, slots], -1), -1)
        n = x.shape[1]
        heads.append(w[..., :n] @ v[..., sl] + w[..., n:] @ (p['mem_v'][h] * S ** 0.5))
    return linear(torch.cat(heads, -1), p, 'proj')


@pytest.mark.parametrize('kw', [{}, {'qk_norm': True, 'norm_layer': torch.nn.LayerNorm, 'qkv_bias': True}])
def test_matches_the_paper_equations_under_every_mask(kw):
    m = build('persistent', C, H, seed=42, num_slots=S, **kw)
    n = 11
    x = torch.randn(2, n, C, **F64)
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[0, :3] = False  # with causality, rows 0-2 see no token key: the slots alone
    keep[1] = False  # no token key at all
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    assert_matches(m, x, lambda t: reference(m, t))
    assert_matches(m, x, lambda t: reference(m, t, keep[:, None, :].expand(2, n, n)), attn_mask=keep)
    assert_matches(m, x, lambda t: reference(m, t, causal.expand(2, n, n)), is_causal=True)
    assert_matches(m, x, lambda t: reference(m, t, keep[:, None, :] & causal), attn_mask=keep, is_causal=True)
    bias = torch.randn(n, n, **F64)
    assert_matches(m, x, lambda t: reference(m, t, None, bias), attn_mask=bias)


def test_rows_without_visible_tokens_attend_to_the_slots_alone():
    m = build('persistent', C, H, seed=42, num_slots=S)
    x = torch.randn(1, 7, C, **F64)
    with torch.no_grad():
        out = m(x, attn_mask=torch.zeros(1, 7, dtype=torch.bool))
        d = C // H
        q = x[0] @ m.qkv.weight[:C].T
        heads = [torch.softmax(q[:, h * d:(h + 1) * d] @ m.mem_k[h].T, -1) @ m.mem_v[h] * S ** 0.5 for h in range(H)]
        slots_only = m.proj(torch.cat(heads, 1))
    torch.testing.assert_close(out[0], slots_only, rtol=1e-12, atol=1e-12)
    assert out.abs().min() > 0  # not the zeros of an empty row: the slots are always visible


def test_equals_timm_attention_rescaled_when_slots_are_zero():
    """With ``mem_k = mem_v = 0`` every slot scores 0 and adds nothing: the output is timm's ``Attention`` output
    (same ``qkv``, ``proj`` the identity) times ``Z / (Z + S)`` per head, ``Z = Σ_j exp(q·k_j/√D)``."""
    theirs = timm.layers.Attention(C, num_heads=H, proj_bias=False).to(torch.float64).eval()
    ours = visattn.create_mixer('persistent', C, num_heads=H, num_slots=S, proj_bias=False, **F64).eval()
    with torch.no_grad():
        theirs.proj.weight.copy_(torch.eye(C))
        assert sorted(ours.load_state_dict(theirs.state_dict(), strict=False).missing_keys) == ['mem_k', 'mem_v']
        ours.mem_k.zero_()
        ours.mem_v.zero_()
        x = torch.randn(2, 63, C, **F64)
        q, k, _ = ours.qkv(x).reshape(2, 63, 3, H, C // H).permute(2, 0, 3, 1, 4)
        z = torch.exp(q @ k.transpose(-1, -2) / (C // H) ** 0.5).sum(-1)  # [B, H, N]
        factor = (z / (z + S)).transpose(1, 2).repeat_interleave(C // H, dim=-1)  # [B, N, C]
        torch.testing.assert_close(ours(x), factor * theirs(x), rtol=1e-10, atol=1e-12)


def test_initialisation_and_arguments():
    m = visattn.create_mixer('persistent', 64, num_heads=4, num_slots=256)
    assert m.mem_k.shape == m.mem_v.shape == (4, 256, 16)
    assert abs(m.mem_k.std().item() - 16 ** -0.5) < 0.02 and abs(m.mem_v.std().item() - 256 ** -0.5) < 0.01
    with pytest.raises(ValueError, match='num_slots'):
        visattn.create_mixer('persistent', 64, num_heads=4, num_slots=0)
