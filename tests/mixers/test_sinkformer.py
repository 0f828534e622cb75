"""``sinkformer`` (2110.11773) against a float64 reference: per sequence, the kernel ``exp(QKᵀ/sqrt(d))`` of the real
tokens only (padded ones removed by indexing), normalised alternately over rows and columns in plain (not log) space
as the paper writes it; outputs and every gradient; one iteration is the softmax Transformer; many iterations give a
doubly stochastic matrix; padding equals removing the padded tokens."""

import pytest
import torch
import torch.nn.functional as F

import visattn
from visattn.mixers.sinkformer import masked_sinkhorn

B, C, H, N = 2, 24, 3, 29


def make(**kw) -> torch.nn.Module:
    torch.manual_seed(42)
    return visattn.create_mixer('sinkformer', C, num_heads=H, dtype=torch.float64, **kw).eval()


def reference(m: torch.nn.Module, x: torch.Tensor, kpm: torch.Tensor) -> torch.Tensor:
    q, k, v = m.split_heads(x)
    heads = []
    for b in range(x.shape[0]):
        real = kpm[b].nonzero().flatten()
        rows = torch.zeros(H, x.shape[1], v.shape[-1], dtype=v.dtype)
        if len(real):
            kernel = torch.exp(q[b][:, real] @ k[b][:, real].transpose(-1, -2) * m.scale)  # [H, n, n]
            for it in range(m.n_iter):
                kernel = kernel / kernel.sum(-1 if it % 2 == 0 else -2, keepdim=True)
            rows[:, real] = kernel @ v[b][:, real]
        heads.append(rows)
    return m.merge_heads(torch.stack(heads))


@pytest.mark.parametrize('n_iter', [1, 2, 3, 6])
def test_matches_plain_sinkhorn_on_the_real_tokens(n_iter):
    m = make(n_iter=n_iter)
    torch.manual_seed(42)
    x = torch.randn(B, N, C, dtype=torch.float64, requires_grad=True)
    kpm = torch.rand(B, N) > 0.3
    kpm[1, 20:] = False
    for mask in (None, kpm):
        out = m(x, attn_mask=mask)
        ref = reference(m, x, torch.ones(B, N, dtype=torch.bool) if mask is None else kpm)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, [x, m.qkv.weight], g)
        want = torch.autograd.grad(ref, [x, m.qkv.weight], g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_one_iteration_is_softmax_attention():
    m = make(n_iter=1)
    torch.manual_seed(42)
    x = torch.randn(B, N, C, dtype=torch.float64)
    q, k, v = m.split_heads(x)
    torch.testing.assert_close(m(x), m.merge_heads(F.scaled_dot_product_attention(q, k, v)), rtol=1e-10, atol=1e-10)


def test_padding_equals_removing_the_padded_tokens():
    m = make()
    torch.manual_seed(42)
    x = torch.randn(1, N, C, dtype=torch.float64)
    kpm = torch.rand(1, N) > 0.4
    out = m(x, attn_mask=kpm)
    torch.testing.assert_close(out[kpm], m(x[:, kpm[0]])[0], rtol=1e-10, atol=1e-10)
    assert (m.merge_heads(torch.zeros(1, H, 1, C // H, dtype=torch.float64)) - out[~kpm]).abs().max() == 0


def test_iterations_converge_to_a_doubly_stochastic_matrix():
    torch.manual_seed(42)
    logits = torch.randn(2, 3, 11, 11, dtype=torch.float64) * 2
    mask = torch.ones(2, 1, 11, 11, dtype=torch.bool)
    mask[1, :, 7:] = False
    mask[1, :, :, 7:] = False
    p = masked_sinkhorn(logits, mask, 201)
    torch.testing.assert_close(p.sum(-1), mask.any(-1).double().expand(2, 3, 11), rtol=0, atol=1e-12)
    torch.testing.assert_close(p.sum(-2), mask.any(-2).double().expand(2, 3, 11), rtol=0, atol=1e-9)
    assert (p[~mask.expand_as(p)] == 0).all()


def test_causal_is_refused():
    with pytest.raises(ValueError, match='causal'):
        make()(torch.randn(1, 5, C, dtype=torch.float64), is_causal=True)
