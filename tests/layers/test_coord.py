"""Coordinate attention (``coord``) and timm's simplified variant (``scoord``): float64 references written from the
equations (output and every gradient, odd sizes, eval and train), timm's modules with the same weights, the paper's
widths, the options, and the hand-written backward of ``axis_gate``."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.layers.coord_attn import CoordAttn as TimmCoordAttn
from timm.layers.coord_attn import SimpleCoordAttn as TimmSimpleCoordAttn

import visattn
from visattn.layers.coord import axis_gate

sys.path.insert(0, str(Path(__file__).parent))
from _timm_equal import assert_same_function  # noqa: E402
from test_gating_blocks import _bn, _check_against_reference, _p, _randomize  # noqa: E402

SIZES = [(7, 9), (13, 17), (1, 1)]


def check_matches_timm(ours: torch.nn.Module, theirs: torch.nn.Module, x: torch.Tensor, training: bool = False):
    """``ours`` loads ``theirs``' state dict (random weights, float64) and computes the same output and the same
    gradients (input and every parameter, matched by name)."""
    assert_same_function(ours, _randomize(theirs), x, training, out_tol=1e-10, grad_tol=1e-9)


def _dense(w, b, z):
    """A 1×1 conv (weight [O, I, 1, 1]) on strips z [B, I, L]."""
    y = torch.einsum('oi,bil->bol', w.flatten(1), z)
    return y if b is None else y + b[:, None]


# ----- references from the equations (x: [B, C, H, W], float64) -----

def ref_coord(x, m, training=False):
    """z^h, z^w pooled, concatenated; f = h-swish(BN(F1 [z^h, z^w])); g^h = σ(F_h f^h), g^w = σ(F_w f^w);
    y = x · g^h · g^w."""
    H = x.shape[2]
    bias = dict(m.named_parameters()).get
    z = torch.cat([x.mean(3), x.mean(2)], dim=2)  # [B, C, H + W]
    f = _dense(_p(m, 'conv1.weight'), bias('conv1.bias'), z)
    if 'bn1.weight' in dict(m.named_parameters()):
        f = _bn(f, m, 'bn1', training)
    f = f * torch.clamp(f + 3, 0, 6) / 6
    g_h = torch.sigmoid(_dense(_p(m, 'conv_h.weight'), bias('conv_h.bias'), f[:, :, :H]))  # [B, C, H]
    g_w = torch.sigmoid(_dense(_p(m, 'conv_w.weight'), bias('conv_w.bias'), f[:, :, H:]))  # [B, C, W]
    return x * g_h[:, :, :, None] * g_w[:, :, None, :]


def ref_scoord(x, m):
    """a^h = W_h SiLU(W_1 z^h + b_1) + b_h (and a^w likewise), y = x · σ(a^h + a^w)."""
    def lin(name, v):  # v: [B, L, I]
        return v @ _p(m, name + '.weight').T + _p(m, name + '.bias')

    def branch(z, name):  # z: [B, C, L]
        h = lin('fc1', z.transpose(1, 2))
        return lin(name, h * torch.sigmoid(h)).transpose(1, 2)  # [B, C, L]

    a_h, a_w = branch(x.mean(3), 'fc_h'), branch(x.mean(2), 'fc_w')
    return x * torch.sigmoid(a_h[:, :, :, None] + a_w[:, :, None, :])


@pytest.mark.parametrize('hw', SIZES)
@pytest.mark.parametrize('training', [False, True])
def test_coord_reference(hw, training):
    m = visattn.create_attn('coord', 64)
    _check_against_reference(m, lambda x, m: ref_coord(x, m, training), torch.randn(3, 64, *hw), training)


def test_coord_reference_without_norm_or_bias():
    m = visattn.create_attn('coord', 32, norm_layer=None, bias=False, rd_channels=6)
    assert m.conv1.bias is None and isinstance(m.bn1, torch.nn.Identity)
    _check_against_reference(m, ref_coord, torch.randn(2, 32, 7, 9))


@pytest.mark.parametrize('hw', SIZES)
def test_scoord_reference(hw):
    _check_against_reference(visattn.create_attn('scoord', 64), ref_scoord, torch.randn(2, 64, *hw))


# ----- against timm's modules, same weights -----

@pytest.mark.parametrize('training', [False, True])
def test_coord_matches_timm(training):
    """timm's CoordAttn is the paper's function with another width and no biases: rd_channels= and bias=False."""
    theirs = TimmCoordAttn(64)
    ours = visattn.create_attn('coord', 64, rd_channels=theirs.conv1.out_channels, bias=False)
    check_matches_timm(ours, theirs, torch.randn(3, 64, 7, 9), training)


def test_coord_matches_timm_with_biases():
    theirs = TimmCoordAttn(48, bias=True, rd_channels=8)
    check_matches_timm(visattn.create_attn('coord', 48), theirs, torch.randn(2, 48, 5, 11))


@pytest.mark.parametrize('channels', [64, 72, 200])
def test_scoord_matches_timm(channels):
    theirs = TimmSimpleCoordAttn(channels)
    ours = visattn.create_attn('scoord', channels)
    assert ours.rd_channels == theirs.fc1.out_features  # same default width, 2/3 of SE's at r = 4
    check_matches_timm(ours, theirs, torch.randn(2, channels, 7, 9))


# ----- widths, options, errors -----

def test_coord_width_is_the_papers():
    # mip = max(8, C // 32): 8 up to C = 256, then C / 32 (MobileNetV2 widths 96 ... 960, ResNet's 256 ... 2048)
    for c, mip in [(16, 8), (96, 8), (144, 8), (256, 8), (384, 12), (576, 18), (960, 30), (1024, 32), (2048, 64)]:
        m = visattn.create_attn('coord', c)
        assert m.rd_channels == mip == m.conv1.out_channels, c
        assert m.conv1.bias is not None and isinstance(m.act, torch.nn.Hardswish)
    assert visattn.create_attn('coord', 512, rd_ratio=1 / 16).rd_channels == 32
    assert visattn.create_attn('coord', 64, min_rd_channels=2, rd_ratio=1 / 16).rd_channels == 4
    assert visattn.create_attn('coord', 64, rd_channels=5).conv_h.in_channels == 5


def test_coord_gate_layer():
    m = _randomize(visattn.create_attn('coord', 32, gate_layer=torch.nn.Hardsigmoid).double()).eval()
    x = torch.randn(2, 32, 5, 7, dtype=torch.float64)
    with torch.no_grad():
        z = torch.cat([x.mean(3, keepdim=True), x.mean(2, keepdim=True).transpose(-1, -2)], 2)
        f = m.act(m.bn1(m.conv1(z)))
        g_h = F.hardsigmoid(m.conv_h(f[:, :, :5]))
        g_w = F.hardsigmoid(m.conv_w(f[:, :, 5:])).transpose(-1, -2)
        torch.testing.assert_close(m(x), x * g_h * g_w)


def test_scoord_width_options():
    assert visattn.create_attn('scoord', 96).rd_channels == 16  # 96 · 1/4 · 2/3 = 16
    assert visattn.create_attn('scoord', 96, se_factor=1.0).rd_channels == 24
    assert visattn.create_attn('scoord', 96, rd_divisor=1, rd_ratio=1 / 8, se_factor=1).rd_channels == 12
    m = visattn.create_attn('scoord', 96, rd_channels=7, bias=False)
    assert m.fc1.out_features == 7 and m.fc1.bias is None


@pytest.mark.parametrize('name, kwargs, arg', [
    ('coord', dict(rd_ratio=1.5), 'rd_ratio'),
    ('coord', dict(rd_channels=0), 'rd_channels'),
    ('scoord', dict(rd_ratio=0.), 'rd_ratio'),
    ('scoord', dict(rd_channels=-2), 'rd_channels'),
])
def test_bad_arguments(name, kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        visattn.create_attn(name, 32, **kwargs)


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
@pytest.mark.parametrize('name', ['coord', 'scoord'])
def test_scripts(name):
    m = _randomize(visattn.create_attn(name, 32)).eval()
    scripted = torch.jit.script(m)
    x = torch.randn(2, 32, 5, 7)
    torch.testing.assert_close(scripted(x), m(x))


# ----- the gate product's hand-written backward -----

@pytest.mark.parametrize('needs', [(True, True, True), (True, False, False), (False, True, False),
                                   (False, False, True)])
def test_axis_gate_backward(needs):
    x, a_h, a_w = torch.randn(2, 3, 5, 7), torch.rand(2, 3, 5, 1), torch.rand(2, 3, 1, 7)
    ins = [t.double().requires_grad_(n) for t, n in zip((x, a_h, a_w), needs)]
    plain = [t.detach().clone().requires_grad_(n) for t, n in zip(ins, needs)]
    y = axis_gate(*ins)
    want = plain[0] * plain[1] * plain[2]
    torch.testing.assert_close(y, want)
    g = torch.randn(3, 5, 7, dtype=torch.float64).expand_as(y)  # a broadcast gradient (stride 0) as from a sum
    got = torch.autograd.grad(y, [t for t in ins if t.requires_grad], g)
    ref = torch.autograd.grad(want, [t for t in plain if t.requires_grad], g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(axis_gate, [t.detach().requires_grad_(n) for t, n in zip(ins, needs)])


def test_axis_gate_mixed_dtypes():
    """Under autocast the gates come out of 16-bit convolutions while x stays float32: the backward returns each
    gradient in its input's dtype, with the float32 values."""
    x = torch.randn(2, 3, 5, 7, requires_grad=True)
    a_h = torch.rand(2, 3, 5, 1).bfloat16().requires_grad_()
    a_w = torch.rand(2, 3, 1, 7).bfloat16().requires_grad_()
    y = axis_gate(x, a_h, a_w)
    assert y.dtype == torch.float32
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, a_h, a_w], g)
    plain = [t.detach().float().requires_grad_() for t in (x, a_h, a_w)]
    want = torch.autograd.grad(plain[0] * plain[1] * plain[2], plain, g)
    for a, b, t in zip(got, want, (x, a_h, a_w)):
        assert a.dtype == t.dtype
        torch.testing.assert_close(a.float(), b, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize('name', ['coord', 'scoord'])
def test_autocast_bf16(name):
    m = _randomize(visattn.create_attn(name, 32)).train()
    x = torch.randn(3, 32, 7, 9, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = m(x)
    (gx,) = torch.autograd.grad(y.float().square().sum(), x)
    x32 = x.detach().requires_grad_()
    y32 = m(x32)
    (gx32,) = torch.autograd.grad(y32.square().sum(), x32)
    torch.testing.assert_close(y.float(), y32, rtol=0.05, atol=0.05)
    torch.testing.assert_close(gx, gx32, rtol=0.1, atol=0.1)
