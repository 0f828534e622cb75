"""ECA's two timm variants, ``ecam`` (an MLP across channels instead of the 1-D convolution) and ``ceca`` (circular
padding across channels), against float64 references written from their equations and against timm's
``EcaModule(use_mlp=True)`` and ``CecaModule`` with the same weights."""

import sys
import warnings
from pathlib import Path

import pytest
import torch
from timm.layers.eca import CecaModule, EcaModule

import visattn
from visattn.layers import eca_kernel_size

sys.path.insert(0, str(Path(__file__).parent))
from _timm_equal import assert_same_function  # noqa: E402
from test_gating_blocks import _check_against_reference, _p, _randomize  # noqa: E402


def ref_ecam(x, m, act=torch.relu):
    """``h_c = δ(w1 s_c + b1)`` per channel c (C_r values), ``z_c = Σ_{r,t} w2[r, t] h_{c+t-p}[r] + b2`` (zero
    padding p = (k-1)/2 of h), ``y = x ⊙ σ(z)``."""
    s = x.mean((2, 3))  # [B, C]
    w1, b1 = _p(m, 'conv.weight').view(-1), _p(m, 'conv.bias')  # [C_r]
    w2, b2 = _p(m, 'conv2.weight')[0], _p(m, 'conv2.bias')  # [C_r, k], [1]
    k, C = w2.shape[1], s.shape[1]
    p = (k - 1) // 2
    h = act(s[:, None, :] * w1[None, :, None] + b1[None, :, None])  # [B, C_r, C]
    hp = torch.cat([h.new_zeros(*h.shape[:2], p), h, h.new_zeros(*h.shape[:2], p)], 2)
    z = sum(torch.einsum('brc,r->bc', hp[:, :, t:t + C], w2[:, t]) for t in range(k)) + b2
    return x * torch.sigmoid(z)[:, :, None, None]


def ref_ceca(x, m):
    """``z_c = Σ_t w_t s_{(c + t - p) mod C}``: ECA's 1-D convolution with circular padding, ``y = x ⊙ σ(z)``."""
    s = x.mean((2, 3))
    w = _p(m, 'conv.weight').view(-1)
    k, C = w.numel(), s.shape[1]
    idx = torch.arange(C)
    z = sum(w[t] * s[:, (idx + t - (k - 1) // 2) % C] for t in range(k))
    return x * torch.sigmoid(z)[:, :, None, None]


@pytest.mark.parametrize('hw', [(7, 9), (13, 17), (1, 1)])
@pytest.mark.parametrize('channels', [24, 64])
def test_ecam_reference(hw, channels):
    _check_against_reference(visattn.create_attn('ecam', channels), ref_ecam, torch.randn(2, channels, *hw))


@pytest.mark.parametrize('hw', [(7, 9), (13, 17), (1, 1)])
@pytest.mark.parametrize('channels, kernel_size', [(24, None), (64, None), (3, 7), (5, 11)])  # 2C + 1: wraps once
def test_ceca_reference(hw, channels, kernel_size):
    m = visattn.create_attn('ceca', channels, kernel_size=kernel_size)
    _check_against_reference(m, ref_ceca, torch.randn(2, channels, *hw))


def test_ceca_is_eca_away_from_the_edges():
    """With the same kernel, circular padding changes only the first and last (k-1)/2 channels' gates."""
    eca, ceca = visattn.create_attn('eca', 32), _randomize(visattn.create_attn('ceca', 32))
    eca.load_state_dict(ceca.state_dict())
    p = (ceca.kernel_size - 1) // 2
    x = torch.randn(2, 32, 5, 7)
    a, b = eca(x), ceca(x)
    torch.testing.assert_close(a[:, p:-p], b[:, p:-p])
    assert not torch.allclose(a[:, :p], b[:, :p]) and not torch.allclose(a[:, -p:], b[:, -p:])


def _assert_same_function(ours, theirs, x):
    """Output and the gradients of x and of every parameter agree in float64, with theirs' weights in ours."""
    assert_same_function(ours, theirs, x)


@pytest.mark.parametrize('channels', [64, 95, 256])  # 95: timm's rounding lifts C/8 = 11.9 to 16, not down to 8
def test_ecam_matches_timm(channels):
    theirs = _randomize(EcaModule(channels, use_mlp=True))
    _assert_same_function(visattn.create_attn('ecam', channels), theirs, torch.randn(2, channels, 7, 9))


@pytest.mark.parametrize('channels', [64, 256, 2048])
def test_ceca_matches_timm(channels):
    theirs = _randomize(CecaModule(channels))
    _assert_same_function(visattn.create_attn('ceca', channels), theirs, torch.randn(2, channels, 3, 5))


@pytest.mark.parametrize('name', ['ecam', 'ceca'])
def test_adaptive_kernel_size_is_eca_s(name):
    for c in (8, 64, 256, 2048):
        m = visattn.create_attn(name, c)
        conv = m.conv2 if name == 'ecam' else m.conv
        assert m.kernel_size == conv.weight.shape[-1] == eca_kernel_size(c)
    assert visattn.create_attn(name, 64, kernel_size=7).kernel_size == 7
    assert visattn.create_attn(name, 64, gamma=1, beta=0).kernel_size == eca_kernel_size(64, 1, 0) == 7
    with pytest.raises(ValueError, match='kernel_size'):
        visattn.create_attn(name, 64, kernel_size=4)
    with pytest.raises(ValueError, match='gamma'):
        visattn.create_attn(name, 64, gamma=0)


def test_ecam_hidden_width():
    assert [visattn.create_attn('ecam', c).rd_channels for c in (8, 64, 95, 256)] == [8, 8, 16, 32]
    assert visattn.create_attn('ecam', 64, rd_ratio=1 / 4, rd_divisor=1).rd_channels == 16
    assert visattn.create_attn('ecam', 64, rd_channels=5).conv.weight.shape[0] == 5


def test_ecam_options():
    m = visattn.create_attn('ecam', 32, act_layer=torch.nn.SiLU)
    _check_against_reference(m, lambda x, m: ref_ecam(x, m, torch.nn.functional.silu), torch.randn(2, 32, 7, 9))
    m = _randomize(visattn.create_attn('ecam', 32, gate_layer='hard_sigmoid')).eval()
    with torch.no_grad():
        m.conv2.weight.mul_(1e-3), m.conv2.bias.zero_()  # hard-sigmoid is 1/2 + z/6 near 0
    x = torch.randn(2, 32, 7, 9)
    z = (ref_ecam(x, m) / x).logit()  # the sigmoid's logits
    torch.testing.assert_close(m(x), x * (0.5 + z / 6), rtol=1e-5, atol=1e-6)


def test_ceca_kernel_wider_than_the_circle_is_refused():
    with pytest.raises(ValueError, match='kernel_size must be at most 2 \\* channels \\+ 1 = 7.*got 9'):
        visattn.create_attn('ceca', 3, kernel_size=9)


@pytest.mark.parametrize('name', ['ecam', 'ceca'])
def test_scripts(name):
    m = _randomize(visattn.create_attn(name, 16)).eval()
    x = torch.randn(2, 16, 5, 7)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        scripted = torch.jit.script(m)
    torch.testing.assert_close(scripted(x), m(x))
