"""MobileViTv2's separable self-attention (``separable``): timm's ``LinearSelfAttention`` with the same weights, a
float64 reference from the paper's equations (single and multi-head, key padding), and its refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from timm.models.mobilevit import LinearSelfAttention

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, build, linear  # noqa: E402

F64 = torch.float64


def _reference(m: torch.nn.Module, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Token by token: c_s = softmax over the (real) tokens of x W_I, c_v = Σ_i c_s(i) x_K(i) per score group,
    y = (ReLU(x W_V) ⊙ c_v) W_O."""
    params = dict(m.named_parameters())
    B, N, C = x.shape
    G = m.num_scores
    proj = linear(x, params, 'qkv')
    scores, keys, values = proj[..., :G], proj[..., G:G + C], proj[..., G + C:]
    out = []
    for b in range(B):
        real = [i for i in range(N) if keep is None or keep[b, i]]
        parts = []
        for g in range(G):
            ch = slice(g * C // G, (g + 1) * C // G)
            e = torch.exp(scores[b, real, g])
            parts.append(e @ keys[b, real, ch] / e.sum() if real else torch.zeros(C // G, dtype=x.dtype))
        out.append(torch.relu(values[b]) * torch.cat(parts))
    return linear(torch.stack(out), params, 'proj')


def test_equals_timm_linear_self_attention_with_the_same_weights():
    """timm's 2-D form ([B, C, P, N], 1×1 convolutions) on P = 1 pixel per patch is the token form."""
    ours = visattn.create_mixer('separable', 12, num_heads=3, qkv_bias=True, dtype=F64).eval()
    theirs = LinearSelfAttention(12, bias=True, dtype=F64).eval()
    with torch.no_grad():
        ours.qkv.weight.copy_(theirs.qkv_proj.weight[:, :, 0, 0])
        ours.qkv.bias.copy_(theirs.qkv_proj.bias)
        ours.proj.weight.copy_(theirs.out_proj.weight[:, :, 0, 0])
        ours.proj.bias.copy_(theirs.out_proj.bias)
    x = torch.randn(2, 63, 12, dtype=F64, requires_grad=True)
    out = ours(x)
    ref = theirs(x.transpose(1, 2)[:, :, None, :])[:, :, 0, :].transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    torch.testing.assert_close(*(torch.autograd.grad((y * g).sum(), x)[0] for y in (out, ref)), rtol=1e-10,
                               atol=1e-10)


@pytest.mark.parametrize('multi_head', [False, True])
def test_matches_the_equations_with_key_padding(multi_head):
    m = build('separable', 12, 3, multi_head=multi_head, qkv_bias=True)
    assert m.qkv.weight.shape == ((3 if multi_head else 1) + 24, 12)
    x = torch.randn(2, 13, 12, dtype=F64)
    keep = torch.ones(2, 13, dtype=torch.bool)
    keep[0, 9:] = False
    keep[1, :2] = False
    assert_matches(m, x, lambda t: _reference(m, t))
    assert_matches(m, x, lambda t: _reference(m, t, keep), attn_mask=keep)


def test_no_real_token_gives_the_projection_bias_and_causal_is_refused():
    m = build('separable', 8, 2)
    x = torch.randn(1, 5, 8, dtype=F64)
    out = m(x, attn_mask=torch.zeros(1, 5, dtype=torch.bool))
    torch.testing.assert_close(out, m.proj.bias.expand_as(out))
    with pytest.raises(ValueError, match='causal'):
        m(x, is_causal=True)
