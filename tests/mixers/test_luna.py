"""Luna (``luna``) against float64 references written from the paper's two nested attentions: the pack and unpack
head by head over the visible tokens, and the causal form position by position (each prefix packed with the
released code's elu + 1 weights and averaged), outputs and every gradient; key padding as removal of the hidden
tokens; duplicated packed slots change nothing; and convergence to full softmax attention (with the composed
projections) as the pack becomes a hard one-to-one assignment (p = N, sharpness β -> ∞), where the two nested
attentions are exactly one.

No maintained package ships Luna as a module (the released code is a fairseq fork), so there is no library to
compare with; the module docstring says where the released code differs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, build, linear  # noqa: E402

F64 = dict(dtype=torch.float64)
C, H = 12, 3


def softmax_rows(s):
    w = torch.exp(s - s.max(-1, keepdim=True).values)
    return w / w.sum(-1, keepdim=True)


def unpack(m, p, xt, packed, heads):
    """Unpack one query row set ``xt`` [n, C] against its packed context [p, C], head by head, then ``proj``."""
    q = linear(xt, p, 'qkv', slice(0, C))
    k = linear(packed, p, 'qkv', slice(C, 2 * C))
    v = linear(packed, p, 'qkv', slice(2 * C, 3 * C))
    d = C // heads
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        qh, kh = m.q_norm(q[:, sl]), m.k_norm(k[:, sl])
        outs.append(softmax_rows(qh @ kh.T / d ** 0.5) @ v[:, sl])
    return linear(torch.cat(outs, 1), p, 'proj')


def pack_parts(p, xb, pheads):
    """Per pack head: the queries P Wᴾᵠ_h [p, pd] and the keys and values X Wᴾᴷ_h, X Wᴾⱽ_h [N, pd]."""
    pq = linear(p['pquery'], p, 'pq')
    pk = linear(xb, p, 'pkv', slice(0, C))
    pv = linear(xb, p, 'pkv', slice(C, 2 * C))
    d = C // pheads
    return [(pq[:, h * d:(h + 1) * d], pk[:, h * d:(h + 1) * d], pv[:, h * d:(h + 1) * d]) for h in range(pheads)]


def reference(m, x, keep=None, pheads=H):
    p = dict(m.named_parameters())
    outs = []
    for b in range(x.shape[0]):
        visible = torch.ones(x.shape[1], dtype=torch.bool) if keep is None else keep[b]
        parts = []
        for pq, pk, pv in pack_parts(p, x[b], pheads):
            if not visible.any():
                parts.append(torch.zeros_like(pq))
                continue
            d = pq.shape[1]
            parts.append(softmax_rows(pq @ pk[visible].T / d ** 0.5) @ pv[visible])
        outs.append(unpack(m, p, x[b], torch.cat(parts, 1), H))
    return torch.stack(outs)


def causal_reference(m, x, keep=None):
    """Position t packs its visible prefix: ``P'_t[l] = Σ_{j<=t visible} φ_jl pv_j / #visible``, φ = elu + 1."""
    p = dict(m.named_parameters())
    outs = []
    for b in range(x.shape[0]):
        visible = torch.ones(x.shape[1], dtype=torch.bool) if keep is None else keep[b]
        heads = pack_parts(p, x[b], m.pack_heads)
        rows = []
        for t in range(x.shape[1]):
            seen = visible.clone()
            seen[t + 1:] = False
            count = max(int(seen.sum()), 1)
            packed = torch.cat([(F.elu(pq @ pk[seen].T / pq.shape[1] ** 0.5) + 1) @ pv[seen] / count
                                for pq, pk, pv in heads], 1)
            rows.append(unpack(m, p, x[b, t:t + 1], packed, H))
        outs.append(torch.cat(rows))
    return torch.stack(outs)


@pytest.mark.parametrize('kw', [{}, {'pack_heads': 2, 'qkv_bias': True}])
def test_pack_unpack_match_the_paper_equations_with_key_padding(kw):
    m = build('luna', C, H, seed=42, pack_len=5, **kw)
    x = torch.randn(3, 63, C, **F64)
    keep = torch.rand(3, 63) > 0.3
    keep[2] = False  # no visible token: P' = 0
    pheads = kw.get('pack_heads', H)
    assert_matches(m, x, lambda t: reference(m, t, None, pheads))
    assert_matches(m, x, lambda t: reference(m, t, keep, pheads), attn_mask=keep)


@pytest.mark.parametrize('kw', [{}, {'qk_norm': True, 'norm_layer': torch.nn.LayerNorm, 'pack_heads': 1}])
def test_causal_form_matches_prefix_packing(kw):
    m = build('luna', C, H, seed=42, pack_len=4, **kw)
    x = torch.randn(2, 13, C, **F64)
    keep = torch.ones(2, 13, dtype=torch.bool)
    keep[0, :3] = False  # the first rows see no visible token: P'_t = 0
    keep[1, [4, 9]] = False
    assert_matches(m, x, lambda t: causal_reference(m, t), is_causal=True)
    assert_matches(m, x, lambda t: causal_reference(m, t, keep), is_causal=True, attn_mask=keep)


@pytest.mark.parametrize('causal', [False, True])
def test_hidden_tokens_are_as_if_removed_and_duplicated_slots_change_nothing(causal):
    m = build('luna', C, H, seed=42, pack_len=3)
    x = torch.randn(1, 20, C, **F64)
    keep = torch.ones(1, 20, dtype=torch.bool)
    keep[0, [0, 6, 7, 13]] = False
    twice = build('luna', C, H, seed=42, pack_len=6)
    state = m.state_dict()
    state['pquery'] = torch.cat([state['pquery'], state['pquery']])
    twice.load_state_dict(state)
    with torch.no_grad():
        out = m(x, attn_mask=keep, is_causal=causal)
        torch.testing.assert_close(out[keep], m(x[:, keep[0]], is_causal=causal)[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(twice(x, attn_mask=keep, is_causal=causal), out, rtol=1e-12, atol=1e-12)


def test_converges_to_full_attention_as_the_pack_becomes_one_to_one():
    """P = the (unit-norm) tokens, Wᴾᴷ = I, Wᴾᵠ = β√d·I: slot l's pack weights are softmax_j(β x_l·x_j), which tends to
    the one-hot of token l as β grows (x_l·x_l = 1 > x_l·x_j), so P' -> X Wᴾⱽ and Luna -> softmax attention with keys
    X Wᴾⱽ Wᴷ and values X Wᴾⱽ Wⱽ; the error falls with β (like exp(-β·margin)) to rounding."""
    n = 9
    m = build('luna', C, H, seed=42, pack_len=n, pack_heads=1)
    x = F.normalize(torch.randn(1, n, C, **F64), dim=-1)
    p = dict(m.named_parameters())
    packed = linear(x[0], p, 'pkv', slice(C, 2 * C))  # X Wᴾⱽ: the limit of P'
    full = unpack(m, p, x[0], packed, H)  # softmax attention of the tokens over X Wᴾⱽ
    errors = []
    with torch.no_grad():
        m.pquery.copy_(x[0])
        m.pkv.weight[:C].copy_(torch.eye(C))
        for beta in (4., 16., 64., 256.):
            m.pq.weight.copy_(beta * C ** 0.5 * torch.eye(C))
            errors.append((m(x)[0] - full).abs().max().item())
    assert all(b < a for a, b in zip(errors, errors[1:])) and errors[0] > 1e-3 and errors[-1] < 1e-10, errors


def test_arguments_and_initialisation():
    m = visattn.create_mixer('luna', 32, num_heads=4, pack_len=16, pack_heads=2)
    assert m.pquery.shape == (16, 32) and m.pkv.weight.shape == (64, 32) and m.pack_head_dim == 16
    assert abs(m.pquery.std().item() - 32 ** -0.5) < 0.04  # N(0, 1/C), as the code's projected embeddings
    with pytest.raises(ValueError, match='pack_heads=5'):
        visattn.create_mixer('luna', 32, num_heads=4, pack_heads=5)
