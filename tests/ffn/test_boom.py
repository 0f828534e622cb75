"""SHA-RNN's Boom layer (``boom``): a float64 reference with the chunk sum written as a loop over the hidden units,
outputs and every gradient at odd sizes; the released code's run-time trimming; ``shortcut=False`` equals timm's
``Mlp`` with the same weights; defaults, options and errors."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, QuickGELU

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from _ffn_reference import check_against_reference  # noqa: E402


def ref_boom(x, w1, b1, out_features, act=F.gelu):
    """y[c] = Σ_j act(W₁ x + b₁)[j·C' + c], one hidden unit at a time."""
    h = act(x @ w1.T + b1)
    y = torch.zeros(*x.shape[:-1], out_features, dtype=x.dtype)
    for unit in range(h.shape[-1]):
        y[..., unit % out_features] += h[..., unit]
    return y


def released_boom(x, w1, b1, act):
    """The released forward (``shortcut=True``): trim to a multiple of the input width at run time, view, sum."""
    h = act(x @ w1.T + b1)
    ninp = x.shape[-1]
    h = torch.narrow(h, -1, 0, h.shape[-1] // ninp * ninp)
    return h.view(*h.shape[:-1], h.shape[-1] // ninp, ninp).sum(dim=-2)


@pytest.mark.parametrize('in_features, hidden, out_features', [(60, 240, None), (13, 39, 13), (12, 70, 7), (9, 9, 9)])
def test_reference_outputs_and_gradients(in_features, hidden, out_features):
    m = visattn.create_ffn('boom', in_features, hidden, out_features=out_features).double()
    out_features = out_features or in_features
    assert m.hidden_features == hidden // out_features * out_features and m.fc1.out_features == m.hidden_features
    check_against_reference(m, torch.randn(2, 63, in_features),
           lambda x: ref_boom(x, m.fc1.weight, m.fc1.bias, out_features))


def test_equals_the_released_forward_which_trims_at_run_time():
    """The released class keeps all ``hidden`` units and trims at every call; ours drops the unused units at
    construction: with its first rows as our weights, the outputs are the same."""
    m = visattn.create_ffn('boom', 8, 30, act_layer=QuickGELU).double()
    assert m.fc1.out_features == 24
    w1, b1 = torch.randn(30, 8, dtype=torch.float64), torch.randn(30, dtype=torch.float64)
    with torch.no_grad():
        m.fc1.weight.copy_(w1[:24]), m.fc1.bias.copy_(b1[:24])
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(m(x), released_boom(x, w1, b1, lambda t: t * torch.sigmoid(1.702 * t)),
                               rtol=1e-12, atol=1e-12)


def test_without_shortcut_it_is_timms_mlp():
    m = visattn.create_ffn('boom', 12, 30, out_features=7, shortcut=False, norm_layer=nn.LayerNorm).double()
    mlp = Mlp(12, 30, 7, norm_layer=nn.LayerNorm).double()
    mlp.load_state_dict(m.state_dict())
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    torch.testing.assert_close(m(x), mlp(x), rtol=1e-10, atol=1e-10)
    assert m.hidden_features == 30


def test_norm_layer_on_the_hidden_features():
    m = visattn.create_ffn('boom', 6, 18, norm_layer=nn.LayerNorm, act_layer=nn.ReLU).double()
    assert m.norm.normalized_shape == (18,)
    check_against_reference(m, torch.randn(4, 6), lambda x: ref_boom(x, m.fc1.weight, m.fc1.bias, 6,
                                                    act=lambda t: F.layer_norm(F.relu(t), (18,), m.norm.weight,
                                                                               m.norm.bias)))


def test_defaults_and_timm_vit():
    m = visattn.create_ffn('boom', 16)
    assert m.shortcut and m.hidden_features == 64 and m.chunks == 4 and isinstance(m.act, nn.GELU)
    assert isinstance(m.fc2, nn.Identity) and sum(p.numel() for p in m.parameters()) == 16 * 64 + 64
    assert visattn.create_ffn('boom', 16, act_layer='silu').act.__class__ is nn.SiLU
    model = visattn.create_ffn('boom', 32, out_features=8)
    assert model.hidden_features == 32 and model.chunks == 4  # default 4·out_features
    plain = visattn.create_ffn('boom', 8, bias=(False, False), drop=(0.1, 0.2), shortcut=False)
    assert plain.fc1.bias is None and plain.fc2.bias is None and (plain.drop1.p, plain.drop2.p) == (0.1, 0.2)


def test_hidden_smaller_than_the_chunk_is_refused():
    with pytest.raises(ValueError, match='hidden_features'):
        visattn.create_ffn('boom', 16, 15)
    assert visattn.create_ffn('boom', 16, 15, shortcut=False).fc1.out_features == 15


def test_bf16_is_close_to_float32():
    m = visattn.create_ffn('boom', 24, 96)
    x = torch.randn(4, 9, 24)
    low = visattn.create_ffn('boom', 24, 96, dtype=torch.bfloat16)
    low.load_state_dict(m.state_dict())
    out = low(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert ((out.float() - m(x)).norm() / m(x).norm()).item() < 0.02
