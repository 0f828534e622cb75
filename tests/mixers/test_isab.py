"""Induced set attention (``isab``) against a float64 reference written from the Set Transformer's equations (the
inner MAB(I, X) with its residual, optionally its LayerNorms and rFF, then Multihead(X, H, H)), head by head with
the hidden tokens dropped from the key set, outputs and every gradient; key padding as removal of the hidden
tokens; permutation equivariance (a set model); the initialisation.

No maintained package ships ISAB as a module (the authors' ``set_transformer`` repository is not packaged), so
there is no library to compare with; its MAB differs from the paper's as the module docstring says."""

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


def multihead(xq, xkv, p, q_name, kv_name, out_name, heads, keep=None, q_rows=slice(None), kv_rows=slice(None)):
    """``Concat_h(softmax(Q_h K_hᵀ/√d) V_h) Wᴼ`` for one sample, looping over the heads: ``xq`` [n, C], ``xkv`` [m, C];
    the keys where ``keep`` [m] is False are dropped from the key set (none left: the head's output is 0)."""
    q = linear(xq, p, q_name, q_rows)
    kv = linear(xkv, p, kv_name, kv_rows)
    k, v = kv[:, :C], kv[:, C:]
    if keep is not None:
        k, v = k[keep], v[keep]
    d = C // heads
    outs = []
    for h in range(heads):
        qh, kh, vh = q[:, h * d:(h + 1) * d], k[:, h * d:(h + 1) * d], v[:, h * d:(h + 1) * d]
        if kh.shape[0] == 0:
            outs.append(torch.zeros_like(qh))
            continue
        w = torch.exp(qh @ kh.T / d ** 0.5)
        outs.append((w / w.sum(1, keepdim=True)) @ vh)
    return linear(torch.cat(outs, 1), p, out_name)


def reference(m, x, keep=None, shared=False, ffn=False):
    p = dict(m.named_parameters())
    outs = []
    for b in range(x.shape[0]):
        kb = None if keep is None else keep[b]
        if shared:
            att = multihead(p['inducing'], x[b], p, 'qkv', 'qkv', 'proj', H, kb, slice(0, C), slice(C, 3 * C))
        else:
            att = multihead(p['inducing'], x[b], p, 'induce_q', 'induce_kv', 'induce_proj', H, kb)
        h = p['inducing'] + att
        if ffn:
            h = F.layer_norm(h, (C,), p['induce_norm0.weight'], p['induce_norm0.bias'])
            h = h + torch.relu(linear(h, p, 'induce_fc'))
            h = F.layer_norm(h, (C,), p['induce_norm1.weight'], p['induce_norm1.bias'])
        outs.append(multihead(x[b], h, p, 'qkv', 'qkv', 'proj', H, None, slice(0, C), slice(C, 3 * C)))
    return torch.stack(outs)


@pytest.mark.parametrize('kw', [{}, {'shared_proj': True}, {'induce_ffn': True, 'qkv_bias': True}])
def test_matches_the_paper_equations_with_key_padding(kw):
    m = build('isab', C, H, seed=42, num_inducing=5, **kw)
    x = torch.randn(3, 63, C, **F64)
    keep = torch.rand(3, 63) > 0.3
    keep[2] = False  # a sequence with no visible token: H = I + the bias of the inner projection
    shared, ffn = kw.get('shared_proj', False), kw.get('induce_ffn', False)
    assert_matches(m, x, lambda t: reference(m, t, None, shared, ffn))
    assert_matches(m, x, lambda t: reference(m, t, keep, shared, ffn), attn_mask=keep)


def test_hidden_tokens_are_as_if_removed_and_the_set_is_permutation_equivariant():
    m = build('isab', C, H, seed=42, num_inducing=4)
    x = torch.randn(1, 20, C, **F64)
    keep = torch.ones(1, 20, dtype=torch.bool)
    keep[0, [1, 7, 8, 15]] = False
    with torch.no_grad():
        torch.testing.assert_close(m(x, attn_mask=keep)[keep], m(x[:, keep[0]])[0], rtol=1e-12, atol=1e-12)
        perm = torch.randperm(20)
        torch.testing.assert_close(m(x[:, perm]), m(x)[:, perm], rtol=1e-12, atol=1e-12)


def test_parameters_initialisation_and_causal_refusal():
    m = visattn.create_mixer('isab', 32, num_heads=4, num_inducing=16)
    assert m.inducing.shape == (16, 32) and m.induce_kv.weight.shape == (64, 32) and m.qkv.weight.shape == (96, 32)
    bound = (6 / (17 * 32)) ** 0.5  # Xavier-uniform of the code's [1, m, C] tensor
    assert m.inducing.abs().max() <= bound and m.inducing.abs().max() > 0.8 * bound
    shared = visattn.create_mixer('isab', 32, num_heads=4, num_inducing=16, shared_proj=True)
    assert shared.induce_q is None and sum(p.numel() for p in shared.parameters()) == 16 * 32 + 4 * 32 * 32 + 32
    with pytest.raises(ValueError, match='causal'):
        m(torch.randn(1, 5, 32), is_causal=True)
