"""Light CBAM (timm's ``LightCbamModule``) against a float64 reference written from its equations, against timm's
module with the same weights, and its fused residual tail."""

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.layers.cbam import LightCbamModule

import visattn
from visattn.layers.ese import HardSigmoid  # float64-exact backward, unlike nn.Hardsigmoid

sys.path.insert(0, str(Path(__file__).parent))
from _timm_equal import assert_same_function  # noqa: E402
from test_gating_blocks import _bn, _check_against_reference, _fc, _p, _randomize  # noqa: E402


def ref_lcbam(x, m, training=False, bias=True, gate=torch.sigmoid):
    """``Mc = σ(MLP((AvgPool(F) + MaxPool(F)) / 2))``, ``F' = Mc ⊙ F``; ``Ms = σ(BN(f_k((AvgPool_c(F') +
    MaxPool_c(F')) / 2)))``, ``F'' = Ms ⊙ F'``."""
    pooled = 0.5 * (x.mean((2, 3)) + x.amax((2, 3)))
    mc = gate(_fc(torch.relu(_fc(pooled, m, 'channel.fc1', bias)), m, 'channel.fc2', bias))
    f1 = x * mc[:, :, None, None]
    s = 0.5 * (f1.mean(1, keepdim=True) + f1.amax(1, keepdim=True))  # [B, 1, H, W]
    w = _p(m, 'spatial.conv.conv.weight')
    ms = gate(_bn(F.conv2d(s, w, padding=w.shape[-1] // 2), m, 'spatial.conv.bn', training))
    return f1 * ms


@pytest.mark.parametrize('hw', [(7, 9), (13, 17), (1, 1)])
@pytest.mark.parametrize('training', [False, True])
@pytest.mark.parametrize('mlp_bias', [True, False])
def test_reference(hw, training, mlp_bias):
    m = visattn.create_attn('lcbam', 32, mlp_bias=mlp_bias)
    _check_against_reference(m, lambda x, m: ref_lcbam(x, m, training, mlp_bias), torch.randn(3, 32, *hw), training)


def test_options():
    m = visattn.create_attn('lcbam', 32, spatial_kernel_size=3, rd_ratio=1 / 4, gate_layer=HardSigmoid)
    assert m.spatial.conv.conv.weight.shape == (1, 1, 3, 3) and m.channel.fc1.weight.shape[0] == 8
    _check_against_reference(m, lambda x, m: ref_lcbam(x, m, gate=lambda t: ((t + 3) / 6).clamp(0, 1)),
                             torch.randn(2, 32, 7, 9))
    with pytest.raises(ValueError, match='spatial_kernel_size'):
        visattn.create_attn('lcbam', 32, spatial_kernel_size=4)


def test_light_gates_are_smaller_than_cbam_s():
    light, full = visattn.create_attn('lcbam', 64), visattn.create_attn('cbam', 64)
    assert light.spatial.conv.conv.weight.shape == (1, 1, 7, 7) and full.spatial.conv.conv.weight.shape == (1, 2, 7, 7)
    assert sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in light.parameters()) == 49


@pytest.mark.parametrize('training', [False, True])
def test_matches_timm(training):
    """timm's default has no MLP biases (``mlp_bias=False``); with that, the same function and gradients."""
    ours, theirs = assert_same_function(visattn.create_attn('lcbam', 64, mlp_bias=False),
                                        _randomize(LightCbamModule(64)), torch.randn(3, 64, 7, 9), training)
    if training:  # the same batch statistics went into the running ones
        for (name, a), b in zip(ours.named_buffers(), theirs.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_forward_add_is_lcbam_plus_shortcut():
    m = _randomize(visattn.create_attn('lcbam', 64)).eval()
    x, shortcut = torch.randn(2, 2, 64, 7, 9).unbind(0)
    want = m(x) + shortcut
    with torch.inference_mode():
        y = x.clone()
        got = m.forward_add(y, shortcut)
    assert got.data_ptr() == y.data_ptr()  # written into the temporary it was given
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ss = [shortcut.clone().requires_grad_() for _ in range(2)]
    outs = [m.forward_add(xs[0], ss[0]), m(xs[1]) + ss[1]]
    g = torch.randn_like(want)
    grads = [torch.autograd.grad(o, (xi, si, *m.parameters()), g) for o, xi, si in zip(outs, xs, ss)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_scripts():
    m = _randomize(visattn.create_attn('lcbam', 16)).eval()
    x = torch.randn(2, 16, 5, 7)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        scripted = torch.jit.script(m)
    torch.testing.assert_close(scripted(x), m(x))
