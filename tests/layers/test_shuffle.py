"""Shuffle attention against a float64 reference written from the paper's equations (group split, channel and spatial
branches, concatenation, channel shuffle as an explicit index map), at odd sizes and 1×1, and its options."""

import math
import sys
from pathlib import Path

import pytest
import torch

import visattn
from visattn.layers.shuffle import default_groups

sys.path.insert(0, str(Path(__file__).parent))
from test_gating_blocks import _check_against_reference, _p  # noqa: E402


def ref_shuffle(x, m, groups, eps=1e-5):
    """Per group k and half (c channels): channel x_k1 · σ(W1 GAP(x_k1) + b1), spatial x_k2 · σ(W2 GN(x_k2) + b2)
    with GN per channel over H×W (biased variance, affine γ, β); concatenated, then shuffled:
    out[:, 2m + i] = pre[:, i·C/2 + m]."""
    B, C, H, W = x.shape
    c = C // (2 * groups)

    def v(name):
        return _p(m, name).reshape(1, c, 1, 1)

    parts = []
    for k in range(groups):
        x1 = x[:, 2 * c * k:2 * c * k + c]
        x2 = x[:, 2 * c * k + c:2 * c * (k + 1)]
        parts.append(x1 * torch.sigmoid(v('cweight') * x1.mean((2, 3), keepdim=True) + v('cbias')))
        mu = x2.mean((2, 3), keepdim=True)
        var = ((x2 - mu) ** 2).mean((2, 3), keepdim=True)
        gn = (x2 - mu) / torch.sqrt(var + eps) * v('gn.weight') + v('gn.bias')
        parts.append(x2 * torch.sigmoid(v('sweight') * gn + v('sbias')))
    pre = torch.cat(parts, 1)
    index = [(k % 2) * (C // 2) + k // 2 for k in range(C)]  # output channel k = 2m + i reads i·C/2 + m
    return pre[:, index]


@pytest.mark.parametrize('hw', [(7, 9), (13, 17), (1, 1), (1, 4)])
@pytest.mark.parametrize('channels, groups', [(256, 64), (64, 8), (24, 3), (20, 5)])
@pytest.mark.parametrize('training', [False, True])
def test_reference(hw, channels, groups, training):
    m = visattn.create_attn('shuffle', channels, groups=groups)
    _check_against_reference(m, lambda x, m: ref_shuffle(x, m, groups), torch.randn(2, channels, *hw) * 2 + 0.5,
                             training)


def test_eps():
    m = visattn.create_attn('shuffle', 32, groups=4, eps=0.5)
    _check_against_reference(m, lambda x, m: ref_shuffle(x, m, 4, eps=0.5), torch.randn(2, 32, 5, 7))


def test_released_code_expression():
    """The released forward (reshape to [b·G, 2c, h, w], chunk, GAP / GroupNorm branches, cat, shuffle by reshape)."""
    m = visattn.create_attn('shuffle', 64, groups=4, dtype=torch.float64)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    x = torch.randn(2, 64, 7, 9, dtype=torch.float64)
    b, c, h, w = x.shape
    xr = x.reshape(b * 4, -1, h, w)
    x0, x1 = xr.chunk(2, dim=1)
    xn = x0 * torch.sigmoid(m.cweight * x0.mean((2, 3), keepdim=True) + m.cbias)
    xs = x1 * torch.sigmoid(m.sweight * m.gn(x1) + m.sbias)
    out = torch.cat([xn, xs], 1).reshape(b, -1, h, w)
    want = out.reshape(b, 2, -1, h, w).permute(0, 2, 1, 3, 4).reshape(b, -1, h, w)
    torch.testing.assert_close(m(x), want, rtol=1e-12, atol=1e-12)


def test_default_groups():
    assert [default_groups(c) for c in (2048, 256, 128, 96, 64, 8, 2)] == [64, 64, 64, 48, 32, 4, 1]
    assert visattn.create_attn('shuffle', 512).groups == 64
    assert visattn.create_attn('shuffle', 64).groups == 32
    assert visattn.create_attn('shuffle', 64, groups=8).groups == 8  # a given value is used as it is


def test_initialisation_state_dict_and_the_shuffle():
    m = visattn.create_attn('shuffle', 256)
    assert set(m.state_dict()) == {'cweight', 'cbias', 'sweight', 'sbias', 'gn.weight', 'gn.bias'}
    assert m.cweight.shape == (1, 2, 1, 1) and m.gn.num_groups == m.gn.num_channels == 2
    assert (m.cweight == 0).all() and (m.sweight == 0).all() and (m.cbias == 1).all() and (m.sbias == 1).all()
    x = torch.randn(2, 256, 5, 7)
    y = m(x)  # at init every gate is σ(1): the block is the channel shuffle, scaled
    s = 1 / (1 + math.exp(-1))
    for i in range(2):
        for k in (0, 3, 127):
            torch.testing.assert_close(y[:, 2 * k + i], x[:, i * 128 + k] * s)


def test_bad_arguments():
    with pytest.raises(ValueError, match='channels must be even, got 63'):
        visattn.create_attn('shuffle', 63)
    with pytest.raises(ValueError, match=r'groups must divide channels / 2 = 48 \(channels=96\), got groups=64'):
        visattn.create_attn('shuffle', 96, groups=64)
    with pytest.raises(ValueError, match='groups'):
        visattn.create_attn('shuffle', 64, groups=0)
    with pytest.raises(TypeError, match='groups'):
        visattn.create_attn('shuffle', 64, groups='4')


def test_inference_writes_the_shuffled_order_and_batch_zero():
    m = visattn.create_attn('shuffle', 32, groups=4)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    x = torch.randn(2, 32, 5, 7)
    with torch.inference_mode():
        fast = m(x)
    assert fast.is_contiguous()
    torch.testing.assert_close(fast, m(x.requires_grad_()).detach())
    assert m(torch.randn(0, 32, 5, 7)).shape == (0, 32, 5, 7)


def test_scripted_and_bf16():
    m = visattn.create_attn('shuffle', 32, groups=4)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    x = torch.randn(2, 32, 5, 7)
    torch.testing.assert_close(torch.jit.script(m)(x), m(x))
    torch.testing.assert_close(torch.jit.script(m)(x[:, :, :1, :1]), m(x[:, :, :1, :1]))
    y16 = m.to(torch.bfloat16)(x.bfloat16())
    assert y16.dtype == torch.bfloat16
