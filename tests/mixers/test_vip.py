"""Vision Permutator's weighted Permute-MLP: the equations in float64 with the FCs as explicit index maps (outputs and
gradients), the released layer's parameters when H = W = segment_dim, prefix tokens, the fixed grid, errors."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import visattn
from visattn.mixers import WeightedPermuteMLP

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, build  # noqa: E402


def _linear(t, layer):
    return t @ layer.weight.T + (0. if layer.bias is None else layer.bias)


def _reference(x: torch.Tensor, m: WeightedPermuteMLP) -> torch.Tensor:
    """Per sample: ``X_H[h, w, gS + s] = Σ_{h', s'} W_H[(h, s), (h', s')] X[h', w, gS + s'] + b_H[(h, s)]``, the
    width branch likewise, ``X_C = X W_Cᵀ + b_C``, ``a = softmax over branches of MLP(mean(X_H + X_W + X_C))`` read
    as [C, 3], ``Y = proj(Σ a ⊙ X_branch)``; prefix tokens use the grid means of X_H and X_W."""
    (H, W), P, G = m.feat_size, m.num_prefix_tokens, m.segment_dim
    C = x.shape[-1]
    S = C // G
    wh = m.mlp_h.weight.reshape(H, S, H, S)
    ww = m.mlp_w.weight.reshape(W, S, W, S)
    outs = []
    for xb in x:
        grid = xb[P:].reshape(H, W, G, S)
        xh = torch.einsum('isjt,jwgt->iwgs', wh, grid)
        xw = torch.einsum('isjt,hjgt->higs', ww, grid)
        if m.mlp_h.bias is not None:
            xh = xh + m.mlp_h.bias.reshape(H, S)[:, None, None, :]
            xw = xw + m.mlp_w.bias.reshape(W, S)[None, :, None, :]
        xh, xw = xh.reshape(H * W, C), xw.reshape(H * W, C)
        xc = _linear(xb[P:], m.mlp_c)
        summary = (xh + xw + xc).mean(0)
        a = _linear(F.gelu(_linear(summary, m.reweight.fc1)), m.reweight.fc2).reshape(C, 3).softmax(-1)
        patches = a[:, 0] * xh + a[:, 1] * xw + a[:, 2] * xc
        prefix = a[:, 0] * xh.mean(0) + a[:, 1] * xw.mean(0) + a[:, 2] * _linear(xb[:P], m.mlp_c)
        outs.append(_linear(torch.cat([prefix, patches]), m.proj))
    return torch.stack(outs)


@pytest.mark.parametrize('qkv_bias', [False, True])
def test_matches_the_equations_float64(qkv_bias):
    m = build('vip', 60, 2, seed=42, qkv_bias=qkv_bias, feat_size=(7, 9), num_prefix_tokens=2, segment_dim=6)
    assert_matches(m, torch.randn(2, 2 + 63, 60, dtype=torch.float64), lambda t: _reference(t, m))


def test_released_layer_parameters_when_the_grid_matches_segment_dim():
    """With H = W = segment_dim the FCs are C×C: the names and shapes of the released ``WeightedPermuteMLP(dim,
    segment_dim)`` (its branch FCs without bias, its default), so its weights load."""
    m = WeightedPermuteMLP(32, num_heads=4, feat_size=8, num_prefix_tokens=0, segment_dim=8)
    released = {'mlp_c.weight': (32, 32), 'mlp_h.weight': (32, 32), 'mlp_w.weight': (32, 32),
                'reweight.fc1.weight': (8, 32), 'reweight.fc1.bias': (8,), 'reweight.fc2.weight': (96, 8),
                'reweight.fc2.bias': (96,), 'proj.weight': (32, 32), 'proj.bias': (32,)}
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == released


def test_patch_tokens_ignore_prefix_tokens():
    """Patch outputs are ViP's on the grid alone (a mixer without prefix tokens, same weights); prefix outputs
    depend on the image."""
    torch.manual_seed(42)
    m = WeightedPermuteMLP(16, num_heads=2, feat_size=(3, 5), num_prefix_tokens=3, segment_dim=4).eval()
    bare = WeightedPermuteMLP(16, num_heads=2, feat_size=(3, 5), num_prefix_tokens=0, segment_dim=4).eval()
    bare.load_state_dict(m.state_dict())
    x = torch.randn(2, 18, 16)
    out = m(x)
    torch.testing.assert_close(out[:, 3:], bare(x[:, 3:]), rtol=0, atol=1e-6)
    x2 = x.clone()
    x2[:, :3] = 10 * torch.randn_like(x2[:, :3])
    torch.testing.assert_close(m(x2)[:, 3:], out[:, 3:], rtol=0, atol=1e-6)
    x3 = x.clone()
    x3[:, 3:] = torch.randn_like(x3[:, 3:])
    assert not torch.allclose(m(x3)[:, :3], out[:, :3], atol=1e-3)


def test_fixed_grid_and_errors():
    m = visattn.create_mixer('vip', 16, num_heads=2, feat_size=(3, 5), num_prefix_tokens=1, segment_dim=4)
    assert m.mlp_h.weight.shape == (12, 12) and m.mlp_w.weight.shape == (20, 20)
    with pytest.raises(ValueError, match='3x5'):
        m(torch.randn(1, 16, 16), feat_size=(5, 3))
    with pytest.raises(ValueError, match='mask'):
        m(torch.randn(1, 16, 16), attn_mask=torch.ones(1, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match='causal'):
        m(torch.randn(1, 16, 16), is_causal=True)
    with pytest.raises(ValueError, match='segment_dim'):
        visattn.create_mixer('vip', 16, num_heads=2, feat_size=(3, 5), segment_dim=3)
