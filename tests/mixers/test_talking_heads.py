"""Talking-heads attention (``talking_heads``, 2003.02436): timm's ``TalkingHeadAttn`` (CaiT) with the same state
dict; a float64 reference from the paper's equations (a loop over the heads of every mixing, masks applied to the
mixed logits and to the mixed weights) for outputs and every gradient, with masks, causality, the paper's
bias-free form and h_l != H logit heads; identity mixing is multi-head attention; masks and their refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from timm.models.cait import TalkingHeadAttn

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, build, out_proj, qkv  # noqa: E402
from _mask_ref import assert_equals_full, assert_matches_under_masks  # noqa: E402

F64 = torch.float64


def _mix(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``out[:, g] = Σ_h weight[g, h] t[:, h] + bias[g]``, head by head."""
    heads = []
    for g in range(weight.shape[0]):
        acc = sum(weight[g, h] * t[:, h] for h in range(weight.shape[1]))
        heads.append(acc + (0. if bias is None else bias[g]))
    return torch.stack(heads, 1)


def _reference(m: torch.nn.Module, x: torch.Tensor, visible: torch.Tensor | None = None,
               add: torch.Tensor | None = None) -> torch.Tensor:
    """J_h = q_h k_hᵀ/√D; L = P_l J + b_l (+ add); W = softmax over the visible keys; U = (P_w W + b_w) on the
    visible pairs, 0 elsewhere; out_h = U_h v_h; then ``proj``."""
    q, k, v = qkv(m, x)
    N = x.shape[1]
    J = torch.einsum('bhid,bhjd->bhij', q, k) / q.shape[-1] ** 0.5
    L = _mix(J, m.proj_l.weight, m.proj_l.bias)
    if add is not None:
        L = L + add
    vis = torch.ones(1, 1, N, N, dtype=torch.bool) if visible is None else visible
    vis = vis.expand(L.shape[0], -1, N, N)
    top = L.masked_fill(~vis, float('-inf')).amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.)  # a row that sees no key: no shift
    e = torch.exp((L - top).masked_fill(~vis, float('-inf')))
    W = e / e.sum(-1, keepdim=True).clamp_min(1e-300)
    U = _mix(W, m.proj_w.weight, m.proj_w.bias) * vis
    return out_proj(m, U @ v)


@pytest.mark.parametrize('qkv_bias', [False, True])
def test_equals_timm_talking_head_attn_with_its_state_dict(qkv_bias):
    """timm's layer (CaiT's) has no masks, no q/k or output norms and always a ``proj`` bias; with the same weights
    the unmasked outputs and gradients agree."""
    C, H = 24, 4
    theirs = TalkingHeadAttn(C, num_heads=H, qkv_bias=qkv_bias).to(F64).eval()
    ours = visattn.create_mixer('talking_heads', C, num_heads=H, qkv_bias=qkv_bias, dtype=F64).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.4)
    ours.load_state_dict(theirs.state_dict())  # strict: the same names (qkv, proj, proj_l, proj_w) and shapes
    x = torch.randn(2, 63, C, dtype=F64, requires_grad=True)
    g = torch.randn(2, 63, C, dtype=F64)
    grads = []
    for m in (ours, theirs):
        y = m(x)
        names, params = zip(*m.named_parameters())
        grads.append((y, dict(zip(('x',) + names, torch.autograd.grad((y * g).sum(), (x,) + params)))))
    (y, got), (want, exp) = grads
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    assert got.keys() == exp.keys()
    for name in got:
        torch.testing.assert_close(got[name], exp[name], rtol=1e-10, atol=1e-10, msg=f'gradient of {name}')


def test_matches_the_equations_with_masks_and_causality():
    m = build('talking_heads', 12, 3)
    assert_matches_under_masks(m, torch.randn(2, 13, 12, dtype=F64), lambda t, **kw: _reference(m, t, **kw))


def test_paper_form_without_biases_and_other_logit_heads():
    m = build('talking_heads', 12, 3, num_logit_heads=5, talking_bias=False)
    assert m.proj_l.weight.shape == (5, 3) and m.proj_w.weight.shape == (3, 5) and m.proj_l.bias is None
    x = torch.randn(2, 11, 12, dtype=F64)
    keep = torch.rand(2, 11) > 0.3
    assert_matches(m, x, lambda t: _reference(m, t))
    assert_matches(m, x, lambda t: _reference(m, t, keep[:, None, None, :]), attn_mask=keep)
    with pytest.raises(ValueError, match='num_logit_heads'):  # a per-head mask names heads L and U do not share
        m(x, attn_mask=torch.ones(2, 3, 11, 11, dtype=torch.bool))


def test_identity_mixing_is_multi_head_attention():
    m = build('talking_heads', 12, 3)
    with torch.no_grad():
        for proj in (m.proj_l, m.proj_w):
            proj.weight.copy_(torch.eye(3, dtype=F64))
            proj.bias.zero_()
    assert_equals_full(m, torch.randn(2, 9, 12, dtype=F64))


def test_weight_bias_never_reaches_hidden_keys():
    """The bias of ``proj_w`` would give every pair a weight, hidden ones too: a row that sees no key gives the
    output of zero heads (``proj``'s bias), and hidden values of any size change nothing."""
    m = build('talking_heads', 12, 3)
    x = torch.randn(1, 7, 12, dtype=F64)
    none = torch.zeros(1, 7, dtype=torch.bool)
    torch.testing.assert_close(m(x, attn_mask=none), out_proj(m, torch.zeros(1, 3, 7, 4, dtype=F64)))
    keep = torch.tensor([[True, False, True, True, False, True, True]])
    loud = torch.where(keep[..., None], x, 1e6 * x)
    torch.testing.assert_close(m(loud, attn_mask=keep)[keep], m(x, attn_mask=keep)[keep], rtol=0, atol=1e-12)
