"""AFT-conv (``aft_conv``, the grid mixer of `visattn.mixers.aft`) against a float64 reference written from the
paper's AFT equation with the full pair-wise bias matrix that the s×s kernel stands for (prefix tokens unbiased),
with key padding; the re-parameterisation of w; the kernel on another grid; its refusals. (AFT-full, -local and
-simple are checked in ``test_mixers_reference.py``.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, build, linear  # noqa: E402

F64 = torch.float64


def _pair_bias(w: torch.Tensor, H: int, W: int, P: int) -> torch.Tensor:
    """w_{t,t'} [h, N, N]: the kernel entry at the offset of t' from t where both are patch tokens within the
    window, 0 elsewhere (prefix rows and columns, tokens outside the window)."""
    h, s, c = w.shape[0], w.shape[-1], w.shape[-1] // 2
    row, col = torch.arange(H * W) // W, torch.arange(H * W) % W
    dy, dx = row[None, :] - row[:, None], col[None, :] - col[:, None]  # offset of t' (columns) from t (rows)
    inside = (dy.abs() <= c) & (dx.abs() <= c)
    entry = w.flatten(1)[:, ((dy + c) * s + dx + c).clamp(0, s * s - 1)]  # [h, HW, HW]
    full = torch.zeros(h, P + H * W, P + H * W, dtype=w.dtype)
    full[:, P:, P:] = torch.where(inside, entry, 0.)
    return full


def _reference(m: torch.nn.Module, x: torch.Tensor, H: int, W: int, keep: torch.Tensor | None = None):
    """``Y_t = σ(Q_t) ⊙ Σ_t' exp(K_t' + w_tt') V_t' / Σ_t' exp(K_t' + w_tt')`` per head (K one channel per head),
    the sums over the real tokens t'."""
    params = dict(m.named_parameters())
    B, N, C = x.shape
    h, D = m.num_heads, m.head_dim
    qkv = linear(x, params, 'qkv')
    q, k, v = qkv[..., :C].reshape(B, N, h, D), qkv[..., C:C + h], qkv[..., C + h:].reshape(B, N, h, D)
    logits = k.transpose(1, 2)[:, :, None, :] + _pair_bias(m.position_bias(), H, W, m.num_prefix_tokens)
    weights = torch.exp(logits)  # [B, h, N(t), N(t')]
    if keep is not None:
        weights = weights * keep[:, None, None, :]
    mixed = weights @ v.transpose(1, 2) / weights.sum(-1, keepdim=True)  # [B, h, N, D]
    out = torch.sigmoid(q) * mixed.transpose(1, 2)
    return linear(out.reshape(B, N, C), params, 'proj')


@pytest.mark.parametrize('reparam', [True, False])
def test_matches_the_aft_equation_on_the_grid_with_key_padding(reparam):
    H, W, P = 7, 9, 1
    m = build('aft_conv', 12, 2, feat_size=(H, W), num_prefix_tokens=P, kernel_size=5, reparam=reparam,
              qkv_bias=True)
    x = torch.randn(2, P + H * W, 12, dtype=F64)
    keep = torch.ones(2, P + H * W, dtype=torch.bool)
    keep[0, 40:] = False
    keep[1, :3] = False
    assert_matches(m, x, lambda t: _reference(m, t, H, W))
    assert_matches(m, x, lambda t: _reference(m, t, H, W, keep), attn_mask=keep)


def test_the_kernel_serves_any_grid_and_a_kernel_larger_than_the_grid():
    m = build('aft_conv', 8, 2, feat_size=(3, 4), num_prefix_tokens=2, kernel_size=7)
    x = torch.randn(1, 2 + 5 * 2, 8, dtype=F64)
    torch.testing.assert_close(m(x, feat_size=(5, 2)), _reference(m, x, 5, 2), rtol=1e-10, atol=1e-10)


def test_reparameterisation_and_initial_state():
    m = visattn.create_mixer('aft_conv', 8, num_heads=2, feat_size=4, kernel_size=3, dtype=F64)
    assert m.qkv.weight.shape == (2 * 8 + 2, 8) and m.pos_bias.shape == (2, 3, 3)
    assert torch.equal(m.position_bias(), torch.zeros(2, 3, 3, dtype=F64))  # γ = β = 0: AFT-simple at the start
    with torch.no_grad():
        m.gain.copy_(torch.tensor([2., -1.]))
        m.bias.copy_(torch.tensor([0.5, 3.]))
    w = m.pos_bias
    for i in range(2):
        std = (w[i] - w[i].mean()).square().mean().sqrt()
        torch.testing.assert_close(m.position_bias()[i], m.gain[i] * (w[i] - w[i].mean()) / std + m.bias[i])
    raw = visattn.create_mixer('aft_conv', 8, num_heads=2, feat_size=4, kernel_size=3, reparam=False)
    assert raw.gain is None and torch.equal(raw.position_bias(), torch.zeros(2, 3, 3))


def test_refuses_an_even_kernel_and_causal():
    with pytest.raises(ValueError, match='kernel_size'):
        visattn.create_mixer('aft_conv', 8, num_heads=2, feat_size=4, kernel_size=4)
    m = visattn.create_mixer('aft_conv', 8, num_heads=2, feat_size=2, num_prefix_tokens=0)
    with pytest.raises(ValueError, match='causal'):
        m(torch.randn(1, 4, 8), is_causal=True)
