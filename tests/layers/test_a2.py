"""The double attention block against a float64 reference written from the paper's equations (A = φ(X), B and V the
two softmaxes, G = A Bᵀ, Z = G V, formed as the paper writes them, where the module reassociates the products), on
output, input and every parameter gradient, at odd sizes and 1×1, with and without the output batch norm in eval and
training; its defaults, identity start, memory bound, bf16, scripting, tracing and use as timm's attn_layer."""

import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import create_feature_extractor

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from test_context_blocks import (  # noqa: E402
    _bn,
    _conv1x1,
    _LargestTensor,
    _normalize_rows,
    _randomize,
    check_against_reference,
)


def ref_a2(x, P, S, training, norm=False):
    flat = x.flatten(2)  # [B, C, N]
    a = _conv1x1(flat, P, 'phi')  # A: [B, c_m, N]
    b = _normalize_rows(_conv1x1(flat, P, 'theta'))  # B: each of the c_n maps a softmax over the N positions
    v = _normalize_rows(_conv1x1(flat, P, 'rho').transpose(1, 2)).transpose(1, 2)  # V: softmax over c_n per position
    g = a @ b.transpose(1, 2)  # gather: [B, c_m, c_n]
    z = g @ v  # distribute: [B, c_m, N]
    y = _conv1x1(z, P, 'out')
    if norm:
        y = _bn(y, P, S, 'norm', training)
    return (flat + y).view_as(x)


@pytest.mark.parametrize('shape', [(2, 16, 7, 9), (1, 16, 13, 17), (2, 16, 1, 1)])
@pytest.mark.parametrize('norm', [False, True])
@pytest.mark.parametrize('training', [False, True])
def test_reference(shape, norm, training):
    m = visattn.create_attn('a2', shape[1], norm=norm)
    check_against_reference(m, lambda *a: ref_a2(*a, norm=norm), torch.randn(shape), training=training)


def test_reference_other_widths():
    m = visattn.create_attn('a2', 12, c_m=5, c_n=3, norm=True)
    assert (m.phi.out_channels, m.theta.out_channels, m.rho.out_channels, m.out.in_channels) == (5, 3, 3, 5)
    check_against_reference(m, lambda *a: ref_a2(*a, norm=True), torch.randn(2, 12, 5, 7), training=False)
    check_against_reference(m, lambda *a: ref_a2(*a, norm=True), torch.randn(2, 12, 5, 7), training=True)


def test_defaults():
    m = visattn.create_attn('a2', 64)
    assert (m.c_m, m.c_n, m.norm) == (16, 16, None)  # C/4 each, no batch norm: the output conv adds to the input
    assert visattn.create_attn('a2', 2).c_m == 1
    meta = visattn.info('a2')
    assert meta.family == 'context' and meta.arxiv == '1810.11579'
    assert f'arXiv:{meta.arxiv}' in sys.modules[type(m).__module__].__doc__


@pytest.mark.parametrize('training', [False, True])
def test_starts_as_identity_with_norm(training):
    x = torch.randn(2, 16, 7, 9)
    torch.testing.assert_close(visattn.create_attn('a2', 16, norm=True).train(training)(x), x)
    assert not torch.allclose(visattn.create_attn('a2', 16).train(training)(x), x)


def test_batch_norm_statistics_update_in_training_only():
    m = _randomize(visattn.create_attn('a2', 8, norm=True))
    before = m.norm.running_mean.clone()
    m.eval()(torch.randn(2, 8, 5, 7))
    assert torch.equal(m.norm.running_mean, before)
    m.train()(torch.randn(2, 8, 5, 7))
    assert not torch.equal(m.norm.running_mean, before)


def test_no_quadratic_tensor():
    """The block keeps O(N·C) memory, forward and backward: no N×N matrix, and no [c_m, N] map either."""
    h, w, c = 24, 40, 8
    m = visattn.create_attn('a2', c)
    x = torch.randn(1, c, h, w, requires_grad=True)
    with _LargestTensor() as probe:
        m(x).sum().backward()
    assert probe.numel <= h * w * c


def test_bf16():
    m32 = _randomize(visattn.create_attn('a2', 32, norm=True)).eval()
    m16 = visattn.create_attn('a2', 32, norm=True, dtype=torch.bfloat16).eval()
    m16.load_state_dict(m32.state_dict())
    x = torch.randn(2, 32, 13, 17)
    with torch.no_grad():
        y32, y16 = m32(x), m16(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert (y16.float() - y32).abs().max() <= 0.05 * y32.abs().max()


def test_bad_arguments():
    for kwargs, exc, match in [
        (dict(c_m=0), ValueError, 'c_m'), (dict(c_n=-1), ValueError, 'c_n'), (dict(c_n=2.0), TypeError, 'c_n'),
    ]:
        with pytest.raises(exc, match=match):
            visattn.create_attn('a2', 16, **kwargs)
    with pytest.raises(ValueError, match='expected 16'):
        visattn.create_attn('a2', 16)(torch.randn(1, 8, 3, 3))


@pytest.mark.parametrize('norm', [False, True])
def test_scripts_and_traces(norm):
    m = _randomize(visattn.create_attn('a2', 16, norm=norm))
    x = torch.randn(2, 16, 5, 7)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit.script is deprecated, not gone
        scripted = torch.jit.script(m)
    for training in (False, True):
        m.train(training), scripted.train(training)
        want = m(x)
        torch.testing.assert_close(scripted(x), want)
        traced = create_feature_extractor(torch.nn.Sequential(m).train(training), ['0'])  # the block is a leaf
        torch.testing.assert_close(traced(x)['0'], want)


def test_as_timm_attn_layer():
    model = timm.create_model('resnet18', num_classes=3, block_args=dict(attn_layer=visattn.get_attn('a2')))
    assert sum(type(m) is visattn.get_attn('a2') for m in model.modules()) == 8
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
