"""Product-key memory (``pkm``): a float64 reference that scores every one of the n² slots with its full key (the
concatenated sub-keys), takes the top-k, the softmax and the weighted sum of the values, head by head, written with
loops and dense matrices (not the product decomposition); outputs and every gradient, BatchNorm in training and in
eval; the selected slots equal the brute-force top-k; defaults, options and errors."""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from _ffn_reference import check_against_reference  # noqa: E402

SMALL = dict(heads=2, topk=4, n_keys=5, k_dim=6)


def build(in_features=7, out_features=None, **kw):
    m = visattn.create_ffn('pkm', in_features, None, out_features=out_features, **{**SMALL, **kw}).double()
    with torch.no_grad():
        if isinstance(m.query_norm, nn.BatchNorm1d):
            m.query_norm.weight.uniform_(0.5, 1.5)
            m.query_norm.bias.uniform_(-0.3, 0.3)
            m.query_norm.running_mean.uniform_(-0.5, 0.5)
            m.query_norm.running_var.uniform_(0.5, 2.)
    return m


def full_keys(keys):
    """Every slot's key: [H, n², d_q], slot a·n + b = concat(sub-key a of the first half, sub-key b of the second)."""
    H, _, n, half = keys.shape
    rows = []
    for a in range(n):
        for b in range(n):
            rows.append(torch.cat([keys[:, 0, a], keys[:, 1, b]], dim=-1))  # [H, d_q]
    return torch.stack(rows, dim=1)


def ref_query(m, rows):
    """Linear, then BatchNorm over the rows: batch statistics (biased variance) in training, running ones in eval."""
    q = rows @ m.query.weight.T + m.query.bias
    bn = m.query_norm
    if not isinstance(bn, nn.BatchNorm1d):
        return q
    if m.training:
        mean, var = q.mean(0), q.var(0, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    return (q - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias


def ref_pkm(m, x):
    """m(x) by brute force over the whole memory: [..., C] -> [..., out]."""
    rows = x.reshape(-1, m.in_features)
    q = ref_query(m, rows).reshape(rows.shape[0], m.heads, m.k_dim)
    keys = full_keys(m.keys)  # [H, n², d_q]
    out = torch.zeros(rows.shape[0], m.out_features, dtype=x.dtype)
    for h in range(m.heads):
        scores = q[:, h] @ keys[h].T  # [R, n²]: the full scoring
        top, slots = scores.topk(m.topk, dim=-1)
        w = torch.exp(top - top.max(-1, keepdim=True).values)
        w = w / w.sum(-1, keepdim=True)
        out = out + (w[..., None] * m.values.weight[slots]).sum(1)
    return out.reshape(*x.shape[:-1], m.out_features)


def brute_force_slots(m, q):
    keys = full_keys(m.keys.double())
    q = q.double().reshape(q.shape[0], m.heads, m.k_dim)
    return torch.einsum('rhd,hmd->rhm', q, keys).topk(m.topk, dim=-1)


@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('kw', [{}, dict(out_features=9), dict(query_norm=False), dict(topk=5, heads=3)])
def test_reference_outputs_and_gradients(training, kw):
    m = build(**kw).train(training)
    got = check_against_reference(m, torch.randn(3, 7, 7), lambda x: ref_pkm(m, x))
    names = [n for n, _ in m.named_parameters()]
    assert got[names.index('values.weight') + 1].abs().sum() > 0 and got[names.index('keys') + 1].abs().sum() > 0


@pytest.mark.parametrize('topk, n_keys', [(1, 7), (4, 7), (7, 7), (16, 40)])
def test_selected_slots_are_the_brute_force_top_k(topk, n_keys):
    """The product decomposition is exact: the k slots chosen from the k² candidates are the top-k of all n² slot
    scores (same slots, same scores, decreasing), for k from 1 to n."""
    m = visattn.create_ffn('pkm', 8, heads=3, topk=topk, n_keys=n_keys, k_dim=10).double()
    q = torch.randn(50, 3 * 10, dtype=torch.float64)
    scores, slots = m.lookup(q)
    want_scores, want_slots = brute_force_slots(m, q)
    assert torch.equal(slots, want_slots)
    torch.testing.assert_close(scores, want_scores, rtol=1e-12, atol=1e-12)
    assert (scores[..., 1:] <= scores[..., :-1]).all()


def test_16_bit_queries_choose_slots_in_float32():
    """A bf16 layer scores its keys in float32: given the same bf16 queries and keys, the slots are those of the
    float64 brute force."""
    m = visattn.create_ffn('pkm', 8, heads=2, topk=8, n_keys=16, k_dim=16, dtype=torch.bfloat16)
    q = torch.randn(64, 32).bfloat16()
    scores, slots = m.lookup(q)
    assert scores.dtype == torch.float32
    assert torch.equal(slots, brute_force_slots(m, q)[1])


def test_defaults_and_memory_size():
    m = visattn.create_ffn('pkm', 48)
    assert (m.heads, m.topk, m.n_keys, m.k_dim) == (4, 32, 64, 256)
    assert m.memory_size == 4096 and m.values.weight.shape == (4096, 48) and m.keys.shape == (4, 2, 64, 128)
    assert isinstance(m.query_norm, nn.BatchNorm1d) and m.query.out_features == 4 * 256 and m.query.bias is not None
    assert m.values.mode == 'sum'
    assert abs(m.values.weight.std().item() - 48 ** -0.5) < 0.01
    assert m.keys.abs().max().item() <= 1 / math.sqrt(128)
    assert abs(m.keys.std().item() - 1 / math.sqrt(3 * 128)) < 0.005
    paper = visattn.create_ffn('pkm', 384, n_keys=512, device='meta')
    assert paper.memory_size == 262_144 and paper.values.weight.shape == (262_144, 384)


def test_hidden_features_and_activation_are_unused():
    counts = {sum(p.numel() for p in visattn.create_ffn('pkm', 16, hidden, act_layer=act, **SMALL).parameters())
              for hidden in (None, 8, 64) for act in (nn.GELU, nn.ReLU)}
    assert len(counts) == 1


def test_heads_are_summed_over_one_shared_table():
    """Two heads read the same value table: the output is the sum of what each head alone reads."""
    m = build(heads=2).eval()
    x = torch.randn(6, 7, dtype=torch.float64)
    q = m.query_norm(m.query(x))
    scores, slots = m.lookup(q)
    w = torch.softmax(scores, dim=-1)
    per_head = [(w[:, h, :, None] * m.values.weight[slots[:, h]]).sum(1) for h in range(2)]
    torch.testing.assert_close(m(x), per_head[0] + per_head[1])


def test_options_bias_drop_norm_sparse():
    m = visattn.create_ffn('pkm', 16, bias=(False, True), drop=(0.5, 0.), norm_layer=nn.LayerNorm, **SMALL)
    assert m.query.bias is None and m.query_drop.p == 0.5 and m.drop.p == 0.
    out = m.eval()(torch.randn(4, 16))
    torch.testing.assert_close(out.mean(-1), torch.zeros(4), atol=1e-5, rtol=0)  # the read-out is normalised
    sparse = visattn.create_ffn('pkm', 16, sparse=True, **SMALL)
    sparse(torch.randn(4, 5, 16)).sum().backward()
    assert sparse.values.weight.grad.is_sparse


def test_dropout_on_queries_and_output():
    m = visattn.create_ffn('pkm', 16, drop=0.3, **SMALL).train()
    x = torch.randn(4, 5, 16)
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, m(x))
    m.eval()
    torch.testing.assert_close(m(x), m(x))


@pytest.mark.parametrize('kw, match', [
    (dict(topk=6, n_keys=5), 'topk'), (dict(k_dim=7), 'k_dim'), (dict(k_dim=1), 'k_dim'),
    (dict(hidden_features=0), 'hidden_features'), (dict(out_features=2.5), 'out_features'),
])
def test_bad_arguments(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        visattn.create_ffn('pkm', 8, **{**SMALL, **kw})
