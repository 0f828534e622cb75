"""sMLP (``smlp``): a float64 reference written from the equations (row and column mixing, concatenation with the
identity, 1×1 fuse; outputs and every gradient at odd sizes), the released code's block with BN + GELU (weights
mapped), the weights' interpolation to other sizes against explicit linear-interpolation matrices (and exactly the
built weights at the built size), options and errors."""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import visattn
from visattn.layers.smlp import resize_axis_linear

sys.path.insert(0, str(Path(__file__).parent))
from _random_params import randomize  # noqa: E402
from test_s2mlp import _check  # noqa: E402


def linear_matrix(n_out, n_in):
    """1-D linear interpolation at pixel centres (align_corners=False, clamped): the [n_out, n_in] matrix."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(math.floor(src), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        m[i, i0] += 1 - lam
        m[i, i1] += lam
    return m


def ref_resize(w, b, n):
    """W' = (n0 / n) · M W Mᵀ, b' = M b: the matrix as a continuous kernel on pixel centres."""
    m = linear_matrix(n, w.shape[0])
    return m @ w @ m.T * (w.shape[0] / n), m @ b


def ref_smlp(x, m, resized=True, pre=None):
    """x_w = x W_wᵀ + b_w (each row), x_h = W_h x + b_h (each column), y = Fuse([x, x_w, x_h])."""
    if pre is not None:
        x = pre(x)
    H, W = x.shape[-2:]
    wh, bh, ww, bw = m.proj_h.weight, m.proj_h.bias, m.proj_w.weight, m.proj_w.bias
    if resized:
        wh, bh = ref_resize(wh, bh, H)
        ww, bw = ref_resize(ww, bw, W)
    x_w = torch.einsum('bchj,wj->bchw', x, ww) + bw
    x_h = torch.einsum('ij,bcjw->bciw', wh, x) + bh[:, None]
    cat = torch.cat([x, x_w, x_h], 1)
    return torch.einsum('oi,bihw->bohw', m.fuse.weight.flatten(1), cat)


def _random(m):
    return randomize(m.double(), 0.3, lambda n, p: n.startswith('norm') and n.endswith('weight'))


@pytest.mark.parametrize('hw', [(7, 9), (13, 17), (1, 1)])
def test_reference_at_the_built_size(hw):
    m = _random(visattn.create_attn('smlp', 6, feat_size=hw))
    wh, bh, ww, bw = m.mixing_weights(*hw)
    assert wh is m.proj_h.weight and bh is m.proj_h.bias and ww is m.proj_w.weight and bw is m.proj_w.bias
    _check(m, torch.randn(2, 6, *hw), lambda x: ref_smlp(x, m, resized=False))


@pytest.mark.parametrize('hw', [(13, 17), (7, 9), (1, 1), (28, 5)])
def test_reference_at_another_size(hw):
    """Built for 14 × 14, run at another size: the maps are the interpolated ones, gradients flow back to the
    built weights."""
    m = _random(visattn.create_attn('smlp', 4))
    got = resize_axis_linear(m.proj_h.weight, m.proj_h.bias, hw[0])
    for a, b in zip(got, ref_resize(m.proj_h.weight, m.proj_h.bias, hw[0])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    _check(m, torch.randn(2, 4, *hw), lambda x: ref_smlp(x, m))


def test_interpolation_keeps_a_mean_a_mean():
    """Built as the mean along each axis (W = 1/n, b = 0), the interpolated maps are the mean at any size."""
    m = visattn.create_attn('smlp', 3, feat_size=(6, 10)).double()
    with torch.no_grad():
        for proj, n in ((m.proj_h, 6), (m.proj_w, 10)):
            proj.weight.fill_(1 / n)
            proj.bias.zero_()
    for size in (1, 4, 13, 25):
        w, b = resize_axis_linear(m.proj_h.weight, m.proj_h.bias, size)
        torch.testing.assert_close(w, torch.full((size, size), 1 / size, dtype=torch.float64))
        assert (b == 0).all()


def released_block(x, m):
    """microsoft/SPACH ``sMLPBlock.forward`` written out (BN, GELU; its proj_h mixes along W, proh_w along H, as
    1×1 convolutions over the permuted map), with our weights: proj_h <- our proj_w, proh_w <- our proj_h."""
    x = F.gelu(m.norm(x))
    x_h = F.conv2d(x.permute(0, 3, 1, 2), m.proj_w.weight[:, :, None, None], m.proj_w.bias).permute(0, 2, 3, 1)
    x_w = F.conv2d(x.permute(0, 2, 1, 3), m.proj_h.weight[:, :, None, None], m.proj_h.bias).permute(0, 2, 1, 3)
    return F.conv2d(torch.cat([x, x_h, x_w], dim=1), m.fuse.weight)


@pytest.mark.parametrize('training', [False, True])
def test_matches_released_block(training):
    m = _random(visattn.create_attn('smlp', 8, feat_size=7, norm_layer=torch.nn.BatchNorm2d, act_layer='gelu'))
    m.train(training)
    _check(m, torch.randn(3, 8, 7, 7), lambda x: released_block(x, m))


def test_default_has_no_preactivation():
    m = visattn.create_attn('smlp', 8)
    assert isinstance(m.norm, torch.nn.Identity) and isinstance(m.act, torch.nn.Identity)
    assert m.fuse.bias is None and m.feat_size == (14, 14)
    assert sum(p.numel() for p in m.parameters()) == 2 * (14 * 14 + 14) + 3 * 8 * 8


def test_bf16():
    m = visattn.create_attn('smlp', 16, feat_size=(7, 9))
    x = torch.randn(2, 16, 7, 9)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = m(x)
    torch.testing.assert_close(y.float(), m(x), rtol=0.1, atol=0.1)


@pytest.mark.parametrize('feat_size', [0, (7, -1), (1, 2, 3)])
def test_bad_feat_size(feat_size):
    with pytest.raises(ValueError, match='feat_size'):
        visattn.create_attn('smlp', 8, feat_size=feat_size)


def test_bad_input():
    with pytest.raises(ValueError, match='SparseMlp'):
        visattn.create_attn('smlp', 8)(torch.randn(1, 4, 3, 3))


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
def test_scripts():
    m = visattn.create_attn('smlp', 8, feat_size=(7, 9)).eval()
    scripted = torch.jit.script(m)
    for hw in [(7, 9), (5, 12)]:
        x = torch.randn(2, 8, *hw)
        torch.testing.assert_close(scripted(x), m(x))
