"""Polarized self-attention against a float64 reference written from the paper's equations (the C/2-channel maps
W_v X and W_q X formed as the paper draws them, where the module reassociates the products), on output and every
gradient, at odd sizes and 1×1, both layouts, with and without biases; its initialisation, scripting and tracing."""

import sys
import warnings
from pathlib import Path

import pytest
import torch
from timm.layers import create_feature_extractor

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from test_gating_blocks import _check_against_reference  # noqa: E402


def _conv1x1(x, m, name):
    """A 1×1 conv of x [B, C, H, W] with the module's parameters ``name.weight`` (and ``name.bias`` if any)."""
    P = dict(m.named_parameters())
    y = torch.einsum('oc,bchw->bohw', P[name + '.weight'][:, :, 0, 0], x)
    if name + '.bias' in P:
        y = y + P[name + '.bias'][None, :, None, None]
    return y


def _softmax(t, dim):
    e = torch.exp(t - t.amax(dim, keepdim=True))
    return e / e.sum(dim, keepdim=True)


def ref_channel(x, m):
    """A_ch(X) = σ(LN(W_z((W_v X) · softmax_HW(W_q X)))): [B, C]."""
    P = dict(m.named_parameters())
    B, C, H, W = x.shape
    v = _conv1x1(x, m, 'ch_wv').reshape(B, -1, H * W)  # [B, C/2, HW]
    q = _softmax(_conv1x1(x, m, 'ch_wq').reshape(B, H * W), 1)  # [B, HW]
    z = torch.einsum('bcn,bn->bc', v, q)[:, :, None, None]  # [B, C/2, 1, 1]
    c = _conv1x1(z, m, 'ch_wz')[:, :, 0, 0]  # [B, C]
    c = (c - c.mean(1, keepdim=True)) / torch.sqrt(c.var(1, unbiased=False, keepdim=True) + 1e-5)
    return torch.sigmoid(c * P['ch_norm.weight'] + P['ch_norm.bias'])


def ref_spatial(x, m):
    """A_sp(X) = σ(softmax_C/2(GAP(W_q' X)) · (W_v' X)): [B, H, W]."""
    B, C, H, W = x.shape
    q = _softmax(_conv1x1(x, m, 'sp_wq').mean((2, 3)), 1)  # [B, C/2]
    v = _conv1x1(x, m, 'sp_wv')  # [B, C/2, H, W]
    return torch.sigmoid(torch.einsum('bc,bchw->bhw', q, v))


def ref_psa(x, m, layout):
    if layout == 'parallel':
        return ref_channel(x, m)[:, :, None, None] * x + ref_spatial(x, m)[:, None] * x
    y = ref_channel(x, m)[:, :, None, None] * x
    return ref_spatial(y, m)[:, None] * y


@pytest.mark.parametrize('layout', ['parallel', 'sequential'])
@pytest.mark.parametrize('shape', [(2, 16, 7, 9), (3, 16, 13, 17), (2, 16, 1, 1)])
@pytest.mark.parametrize('bias', [False, True])
def test_reference(layout, shape, bias):
    m = visattn.create_attn('polarized', shape[1], layout=layout, bias=bias)
    for training in (False, True):  # no batch statistics: both modes compute the same function
        _check_against_reference(m, lambda x, m: ref_psa(x, m, layout), torch.randn(shape), training)


def test_reference_other_width():
    m = visattn.create_attn('polarized', 12, rd_channels=5, layout='sequential', bias=True)
    assert m.ch_wv.out_channels == m.sp_wq.out_channels == m.sp_wv.out_channels == 5
    _check_against_reference(m, lambda x, m: ref_psa(x, m, 'sequential'), torch.randn(2, 12, 5, 7))


def test_layouts_differ():
    torch.manual_seed(0)
    par = visattn.create_attn('polarized', 16)
    seq = visattn.create_attn('polarized', 16, layout='sequential')
    seq.load_state_dict(par.state_dict())
    x = torch.randn(2, 16, 7, 9)
    assert not torch.allclose(par(x), seq(x), atol=1e-3)


def test_defaults_follow_the_paper_and_the_released_code():
    torch.manual_seed(0)
    c = 256
    m = visattn.create_attn('polarized', c)
    assert m.layout == 'parallel' and m.rd_channels == c // 2
    assert all(conv.bias is None for conv in (m.ch_wq, m.ch_wv, m.ch_wz, m.sp_wq, m.sp_wv))
    assert torch.equal(m.ch_norm.weight, torch.ones(c)) and torch.equal(m.ch_norm.bias, torch.zeros(c))
    # Kaiming normal, fan-in: std sqrt(2 / C) for the query and value convs (PyTorch's default would be 1/sqrt(3C))
    for conv in (m.ch_wv, m.sp_wq, m.sp_wv):
        assert abs(conv.weight.std().item() / (2 / c) ** 0.5 - 1) < 0.05
    assert abs(m.ch_wz.weight.std().item() * (3 * c // 2) ** 0.5 - 1) < 0.05  # W_z keeps PyTorch's default
    assert visattn.info('polarized').family == 'spatial' and visattn.info('polarized').arxiv == '2107.00782'


def test_bad_arguments():
    with pytest.raises(ValueError, match='layout'):
        visattn.create_attn('polarized', 16, layout='both')
    with pytest.raises(ValueError, match='rd_ratio'):
        visattn.create_attn('polarized', 16, rd_ratio=0)
    with pytest.raises(TypeError, match='rd_channels'):
        visattn.create_attn('polarized', 16, rd_channels=2.5)
    with pytest.raises(ValueError, match='expected 16'):
        visattn.create_attn('polarized', 16)(torch.randn(1, 8, 3, 3))


@pytest.mark.parametrize('layout', ['parallel', 'sequential'])
def test_scripts_and_traces(layout):
    m = visattn.create_attn('polarized', 16, layout=layout).eval()
    x = torch.randn(2, 16, 5, 7)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit.script is deprecated, not gone
        scripted = torch.jit.script(m)
    torch.testing.assert_close(scripted(x), m(x))
    traced = create_feature_extractor(torch.nn.Sequential(m).eval(), ['0'])  # timm's tracer: the block is a leaf
    torch.testing.assert_close(traced(x)['0'], m(x))
