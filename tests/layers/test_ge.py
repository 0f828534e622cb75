"""Gather-Excite (GE-θ⁻, GE-θ, GE-θ⁺) against float64 references written from the paper's equations and the
released prototxts, and against timm's ``GatherExcite`` with the same weights where timm has the same operator."""

import math
import sys
import warnings
from pathlib import Path

import pytest
import timm.layers.gather_excite as timm_ge
import torch
import torch.nn.functional as F

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from test_gating_blocks import _bn, _check_against_reference, _p, _randomize  # noqa: E402


def _window(n, e, dtype):
    """[⌈n/e⌉, n] averaging weights: cell i averages the positions within e − 1 of i·e, inside [0, n)."""
    cells = torch.arange(math.ceil(n / e))[:, None]
    inside = ((torch.arange(n)[None, :] - cells * e).abs() <= e - 1).to(dtype)
    return inside / inside.sum(1, keepdim=True)


def gather_pool(x, e):
    """GE-θ⁻'s gather: cell (i, j) averages the pixels of rows/cols within e − 1 of (i·e, j·e) (a (2e−1)² window,
    stride e) that lie inside the map; ⌈H/e⌉ × ⌈W/e⌉ cells. e = 0: global average pooling."""
    if e == 0:
        return x.mean((2, 3), keepdim=True)
    H, W = x.shape[-2:]
    return torch.einsum('ih,bchw,jw->bcij', _window(H, e, x.dtype), x, _window(W, e, x.dtype))


def gather_conv(x, m, e, training, last_act, norm=True):
    """GE-θ's gather: log2(e) depthwise 3×3 stride-2 convs (padding 1) with BN, ReLU between; e = 0: one
    depthwise conv whose kernel is the whole map (no padding), then BN. ``last_act``: ReLU after the last BN."""
    n = 1 if e == 0 else int(math.log2(e))
    for i in range(1, n + 1):
        wt = _p(m, f'gather.conv{i}.weight')  # [C, 1, kh, kw]
        if e == 0:
            x = (x * wt[:, 0]).sum((2, 3), keepdim=True)
        else:
            x = F.conv2d(x, wt, stride=2, padding=1, groups=x.shape[1])
        if norm:
            x = _bn(x, m, f'gather.norm{i}', training)
        if i < n or last_act:
            x = torch.relu(x)
    return x


def conv1x1(x, m, prefix):
    return torch.einsum('bchw,rc->brhw', x, _p(m, prefix + '.weight').flatten(1)) + _p(m, prefix + '.bias')[:, None,
                                                                                                                 None]


def upsample_nearest(g, H, W):
    """Position (y, x) takes cell (⌊y·h/H⌋, ⌊x·w/W⌋): nearest-neighbour resizing of the h × w map to H × W."""
    h, w = g.shape[-2:]
    return g[:, :, (torch.arange(H) * h) // H][:, :, :, (torch.arange(W) * w) // W]


def ref_ge(x, m, extent=0, extra_params=False, use_mlp=False, training=False, last_act=None, norm=True):
    """``y = x ⊙ σ(interp(ξE(ξG(x))))``, ξE the SE bottleneck for θ⁺ (identity otherwise)."""
    if extra_params:
        g = gather_conv(x, m, extent, training, use_mlp if last_act is None else last_act, norm)
    else:
        g = gather_pool(x, extent)
    if use_mlp:
        g = conv1x1(torch.relu(conv1x1(g, m, 'mlp.fc1')), m, 'mlp.fc2')
    return x * upsample_nearest(torch.sigmoid(g), *x.shape[-2:])


HW = [(7, 9), (13, 17), (1, 1)]


@pytest.mark.parametrize('hw', HW)
@pytest.mark.parametrize('extent', [0, 1, 2, 3, 8])
@pytest.mark.parametrize('use_mlp', [False, True])
def test_theta_minus_reference(hw, extent, use_mlp):
    m = visattn.create_attn('ge', 16, extent=extent, use_mlp=use_mlp)
    _check_against_reference(m, lambda x, m: ref_ge(x, m, extent, use_mlp=use_mlp), torch.randn(2, 16, *hw))


@pytest.mark.parametrize('hw', HW)
@pytest.mark.parametrize('extent', [2, 8])
@pytest.mark.parametrize('use_mlp', [False, True])
@pytest.mark.parametrize('training', [False, True])
def test_theta_reference(hw, extent, use_mlp, training):
    m = visattn.create_attn('ge', 16, extent=extent, extra_params=True, use_mlp=use_mlp)
    _check_against_reference(m, lambda x, m: ref_ge(x, m, extent, True, use_mlp, training), torch.randn(3, 16, *hw),
                             training)


@pytest.mark.parametrize('hw', HW)
@pytest.mark.parametrize('use_mlp', [False, True])
@pytest.mark.parametrize('training', [False, True])
def test_global_theta_reference(hw, use_mlp, training):
    m = visattn.create_attn('ge', 16, extra_params=True, use_mlp=use_mlp, feat_size=hw)
    assert m.gather.conv1.weight.shape == (16, 1, *hw)
    _check_against_reference(m, lambda x, m: ref_ge(x, m, 0, True, use_mlp, training), torch.randn(3, 16, *hw),
                             training)


@pytest.mark.parametrize('extent', [0, 2])
@pytest.mark.parametrize('use_mlp, gather_act, last_act', [(True, None, True), (True, False, False),
                                                           (False, None, False), (False, True, True)])
def test_gather_act(extent, use_mlp, gather_act, last_act):
    """θ⁺ has a ReLU after the gather's norm by default (the released GE-θ⁺), none with gather_act=False (timm);
    θ has none unless asked."""
    fs = dict(feat_size=(7, 9)) if extent == 0 else {}
    m = visattn.create_attn('ge', 16, extent=extent, extra_params=True, use_mlp=use_mlp, gather_act=gather_act, **fs)
    assert ('act1' in dict(m.gather.named_children())) == last_act
    _check_against_reference(m, lambda x, m: ref_ge(x, m, extent, True, use_mlp, last_act=last_act),
                             torch.randn(2, 16, 7, 9))


@pytest.mark.parametrize('extent', [0, 4])
def test_norm_layer_none(extent):
    fs = dict(feat_size=(7, 9)) if extent == 0 else {}
    m = visattn.create_attn('ge', 16, extent=extent, extra_params=True, norm_layer=None, **fs)
    assert not any('norm' in k for k in m.state_dict())
    _check_against_reference(m, lambda x, m: ref_ge(x, m, extent, True, norm=False), torch.randn(2, 16, 7, 9))


def test_default_is_parameter_free_global_theta_minus():
    m = visattn.create_attn('ge', 16)
    assert not list(m.parameters())
    x = torch.randn(2, 16, 5, 7)
    torch.testing.assert_close(m(x), x * torch.sigmoid(x.mean((2, 3), keepdim=True)))


def test_extent_gates_positions():
    """With a finite extent the gate varies across positions, in cells of about e × e."""
    x = torch.randn(1, 4, 8, 8)
    gate = visattn.create_attn('ge', 4, extent=4)(x) / x
    cells = gate.unflatten(2, (2, 4)).unflatten(4, (2, 4))  # [B, C, 2, 4, 2, 4]: 4×4 cells
    torch.testing.assert_close(cells, cells[:, :, :, :1, :, :1].expand_as(cells))
    assert cells[:, :, 0, 0, 0, 0].ne(cells[:, :, 1, 0, 1, 0]).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match='extent must be 0 or a power of two.*got 3'):
        visattn.create_attn('ge', 16, extent=3, extra_params=True)
    with pytest.raises(ValueError, match='feat_size'):
        visattn.create_attn('ge', 16, extra_params=True)
    with pytest.raises(ValueError, match='feat_size must be an int in'):
        visattn.create_attn('ge', 16, extra_params=True, feat_size=(7, 0))
    with pytest.raises(ValueError, match='gather_act'):
        visattn.create_attn('ge', 16, gather_act=True)
    m = visattn.create_attn('ge', 16, extra_params=True, feat_size=7)
    with pytest.raises(ValueError, match='7×7 kernel'):
        m(torch.randn(2, 16, 7, 9))
    with pytest.raises(ValueError, match='batch of at least 2'):  # its BN runs over [B, C, 1, 1]
        m.train()(torch.randn(1, 16, 7, 7))
    assert m.eval()(torch.randn(1, 16, 7, 7)).shape == (1, 16, 7, 7)


# ----- timm -----

def _drop_stray_dd(fn):
    """timm 1.0.31's GatherExcite passes its factory arguments as ``*dd``: the strings 'device' and 'dtype' land in
    positional slots (kernel_size, act_layer, eps, momentum). This drops exactly those two strings."""
    def wrapped(*args, **kwargs):
        return fn(*[a for a in args if not (isinstance(a, str) and a in ('device', 'dtype'))], **kwargs)
    return wrapped


class _TorchNnWithFixedBatchNorm:
    def __getattr__(self, name):
        return getattr(torch.nn, name)

    BatchNorm2d = staticmethod(_drop_stray_dd(torch.nn.BatchNorm2d))


@pytest.fixture
def timm_ge_cls(monkeypatch):
    """timm's GatherExcite with only its constructor bug patched (``*dd`` passed positionally to ConvMlp,
    create_conv2d and nn.BatchNorm2d: without this it cannot build with use_mlp=True or extra_params=True)."""
    with pytest.raises(TypeError):  # the bug this works around; when timm fixes it, this fails: drop the patch
        timm_ge.GatherExcite(16)
    monkeypatch.setattr(timm_ge, 'ConvMlp', _drop_stray_dd(timm_ge.ConvMlp))
    monkeypatch.setattr(timm_ge, 'create_conv2d', _drop_stray_dd(timm_ge.create_conv2d))
    monkeypatch.setattr(timm_ge, 'nn', _TorchNnWithFixedBatchNorm())
    return timm_ge.GatherExcite


@pytest.mark.parametrize('kw', [
    dict(extent=0, use_mlp=False), dict(extent=0, use_mlp=True), dict(extent=2, use_mlp=False),
    dict(extent=4, use_mlp=True), dict(extent=2, extra_params=True, use_mlp=False),
    dict(extent=8, extra_params=True, use_mlp=False), dict(extent=4, extra_params=True, use_mlp=True),
], ids=str)
@pytest.mark.parametrize('training', [False, True])
def test_matches_timm(timm_ge_cls, kw, training):
    """The same function and gradients in float64. timm's θ⁺ has no ReLU after the gather (gather_act=False)."""
    theirs = _randomize(timm_ge_cls(16, **kw)).double().train(training)
    ours_kw = dict(kw, gather_act=False) if kw.get('extra_params') else kw
    ours = visattn.create_attn('ge', 16, **ours_kw).double().train(training)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 16, 13, 17, dtype=torch.float64)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    out, want = ours(xs[0]), theirs(xs[1])
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    names = [n for n, _ in theirs.named_parameters()]
    mine = dict(ours.named_parameters())
    got = torch.autograd.grad(out, [xs[0]] + [mine[n] for n in names], g)
    exp = torch.autograd.grad(want, [xs[1]] + list(theirs.parameters()), g)
    for name, a, b in zip(['x'] + names, got, exp):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f'gradient of {name}')


def test_timm_global_parametric_gather_is_not_global(timm_ge_cls):
    """Why the global GE-θ is checked against the reference only: timm pads its full-map depthwise kernel by
    (k − 1)/2, so its 'global' gather keeps the map's size (the prototxt's, without padding, gives 1×1)."""
    theirs = timm_ge_cls(16, extra_params=True, extent=0, feat_size=(7, 9), use_mlp=False)
    assert theirs.gather(torch.randn(2, 16, 7, 9)).shape[-2:] == (7, 9)
    assert visattn.create_attn('ge', 16, extra_params=True, feat_size=(7, 9)).gather(
        torch.randn(2, 16, 7, 9)).shape[-2:] == (1, 1)


@pytest.mark.parametrize('kw', [dict(extent=2), dict(extent=2, extra_params=True, use_mlp=True),
                                dict(extra_params=True, feat_size=(5, 7))], ids=str)
def test_scripts(kw):
    m = _randomize(visattn.create_attn('ge', 16, **kw)).eval()
    x = torch.randn(2, 16, 5, 7)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        scripted = torch.jit.script(m)
    torch.testing.assert_close(scripted(x), m(x))
