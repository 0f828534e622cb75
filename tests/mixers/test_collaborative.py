"""Collaborative multi-head attention (``collaborative``, 2006.16362): a float64 reference from the paper's equation
(a loop over the heads: ``X W̃_Q diag(m_h) W̃_Kᵀ Xᵀ`` plus the content bias, then a softmax over the visible keys)
for outputs and every gradient, with masks, causality and a shared width that H does not divide; the paper's
re-parametrisation of biased multi-head attention (timm's ``Attention``, same weights); the mixing initialisations
and the argument checks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from timm.layers import Attention

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, build, linear, out_proj, split  # noqa: E402
from _mask_ref import assert_matches_under_masks  # noqa: E402

F64 = torch.float64


def _reference(m: torch.nn.Module, x: torch.Tensor, visible: torch.Tensor | None = None,
               add: torch.Tensor | None = None) -> torch.Tensor:
    """Head h: logits = (Q diag(m_h) Kᵀ + 1 (X w_h)ᵀ) / sqrt(D̃_k / H) (+ add), softmax over the visible keys,
    times the head's values; then ``proj``."""
    params, Dk, H = dict(m.named_parameters()), m.key_dim, m.num_heads
    Q = linear(x, params, 'qkv', slice(0, Dk))
    K = linear(x, params, 'qkv', slice(Dk, 2 * Dk))
    V = split(linear(x, params, 'qkv', slice(2 * Dk, None)), H)
    heads = []
    for h in range(H):
        logits = Q @ torch.diag(m.mixing[h]) @ K.transpose(1, 2)  # [B, N, N]
        if m.content_bias is not None:
            logits = logits + (x @ m.content_bias.weight[h])[:, None, :]
        logits = logits / (Dk / H) ** 0.5
        if add is not None:
            logits = logits + add[:, 0]
        if visible is not None:
            logits = logits.masked_fill(~visible[:, h if visible.shape[1] > 1 else 0], float('-inf'))
        w = torch.softmax(logits, -1).nan_to_num(0.)  # a row that sees no key: zeros
        heads.append(w @ V[:, h])
    return out_proj(m, torch.stack(heads, 1))


def test_matches_the_equation_with_masks_and_causality():
    m = build('collaborative', 12, 3, key_dim=10)  # D̃_k = 10: not a multiple of H
    x = torch.randn(2, 13, 12, dtype=F64)
    assert_matches_under_masks(m, x, lambda t, **kw: _reference(m, t, **kw))
    causal = torch.ones(13, 13, dtype=torch.bool).tril()
    plain = build('collaborative', 12, 3, key_dim=6, content_bias=False, qkv_bias=True)
    assert plain.content_bias is None and plain.qkv.weight.shape == (2 * 6 + 12, 12)
    assert_matches(plain, x, lambda t: _reference(plain, t, causal[None, None]), is_causal=True)


def test_reparametrises_biased_multi_head_attention():
    """The paper's bias argument: with concatenated-head mixing and D̃_k = dim, timm's ``Attention`` with biased q, k
    is reproduced by *no* query/key bias and the content bias ``w_h = W_K^hᵀ b_Q^h`` (the other bias terms are
    constant along the keys and cancel in the softmax)."""
    C, H = 12, 3
    torch.manual_seed(42)
    theirs = Attention(C, num_heads=H, qkv_bias=True).to(F64).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.4)
    ours = visattn.create_mixer('collaborative', C, num_heads=H, qkv_bias=True, mixing_init='concatenate',
                                dtype=F64).eval()
    with torch.no_grad():
        ours.qkv.weight.copy_(theirs.qkv.weight)
        ours.qkv.bias.copy_(theirs.qkv.bias)
        ours.qkv.bias[:2 * C] = 0.  # no query or key bias
        b_q = theirs.qkv.bias[:C].view(H, C // H)
        w_k = theirs.qkv.weight[C:2 * C].view(H, C // H, C)
        ours.content_bias.weight.copy_(torch.einsum('hd,hdc->hc', b_q, w_k))
        ours.proj.load_state_dict(theirs.proj.state_dict())
    x = torch.randn(2, 17, C, dtype=F64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)
    keep = torch.rand(2, 17) > 0.3
    torch.testing.assert_close(ours(x, attn_mask=keep), theirs(x, attn_mask=keep[:, None, None, :]),
                               rtol=1e-10, atol=1e-10)


def test_mixing_initialisations():
    m = visattn.create_mixer('collaborative', 12, num_heads=3, key_dim=10, mixing_init='concatenate')
    blocks = torch.zeros(3, 10)
    blocks[0, :4], blocks[1, 4:8], blocks[2, 8:] = 1., 1., 1.  # ceil(10 / 3) = 4 columns a head, the last 2
    assert torch.equal(m.mixing.detach(), blocks)
    big = visattn.create_mixer('collaborative', 64, num_heads=8, key_dim=512)
    assert abs(big.mixing.std().item() - 0.2) < 0.02  # the released package's N(0, 0.2²)
    xavier = visattn.create_mixer('collaborative', 64, num_heads=8, key_dim=512, mixing_init='xavier')
    assert xavier.mixing.abs().max().item() <= (6 / (8 + 512)) ** 0.5
    with pytest.raises(ValueError, match='mixing_init'):
        visattn.create_mixer('collaborative', 12, num_heads=3, mixing_init='ones')


def test_qk_norm_normalises_the_shared_projections():
    m = visattn.create_mixer('collaborative', 12, num_heads=3, key_dim=10, qk_norm=True,
                             norm_layer=torch.nn.LayerNorm).eval()
    assert m.q_norm.normalized_shape == (10,) and m.k_norm.normalized_shape == (10,)
    assert m(torch.randn(2, 5, 12)).shape == (2, 5, 12)
