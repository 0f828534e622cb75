"""PoolFormer's pooling mixer (``poolformer``): a float64 reference with the windows written out (outputs and input
gradients at odd sizes and maps smaller than the window), timm's ``Pooling`` (same function, no parameters), the
3×3 receptive field, options and errors."""

import pytest
import torch
from timm.models.metaformer import Pooling

import visattn
from visattn.layers.poolformer import pool_mix


def ref_pool(x, k):
    """y[i, j] = mean of x over the k × k window around (i, j) clipped to the map, minus x[i, j]."""
    H, W = x.shape[-2:]
    r = k // 2
    rows = []
    for i in range(H):
        cols = []
        for j in range(W):
            win = x[:, :, max(i - r, 0):i + r + 1, max(j - r, 0):j + r + 1]
            cols.append(win.mean((2, 3)) - x[:, :, i, j])
        rows.append(torch.stack(cols, -1))
    return torch.stack(rows, -2)


@pytest.mark.parametrize('hw', [(7, 9), (13, 17), (1, 1), (2, 3)])
@pytest.mark.parametrize('k', [3, 5])
def test_reference(hw, k):
    m = visattn.create_attn('poolformer', 4, pool_size=k)
    x = torch.randn(2, 4, *hw, dtype=torch.float64, requires_grad=True)
    out, want = m(x), ref_pool(x, k)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(want, x, g)[0])


@pytest.mark.parametrize('k', [3, 7])
def test_matches_timm(k):
    theirs, ours = Pooling(pool_size=k), visattn.create_attn('poolformer', 16, pool_size=k)
    assert ours.state_dict().keys() == theirs.state_dict().keys() == set()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 16, 13, 17, dtype=torch.float64, requires_grad=True)
    out, want = ours(x), theirs(x)
    torch.testing.assert_close(out, want, rtol=1e-14, atol=1e-14)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(want, x, g)[0],
                               rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize('pos', [(3, 4), (0, 0), (6, 8), (0, 5)])
def test_receptive_field(pos):
    """A change at one pixel moves exactly the outputs of its 3 × 3 neighbourhood (clipped), in its channel."""
    m = visattn.create_attn('poolformer', 3)
    x = torch.randn(1, 3, 7, 9, dtype=torch.float64)
    x2 = x.clone()
    x2[0, 1, pos[0], pos[1]] += 1.0
    moved = (m(x2) - m(x)).abs() > 1e-12
    want = torch.zeros_like(moved)
    want[0, 1, max(pos[0] - 1, 0):pos[0] + 2, max(pos[1] - 1, 0):pos[1] + 2] = True
    assert torch.equal(moved, want)


def test_no_grad_and_bf16():
    x = torch.randn(2, 8, 5, 7)
    with torch.no_grad():
        torch.testing.assert_close(pool_mix(x), Pooling()(x))
    y = pool_mix(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), Pooling()(x), rtol=0.02, atol=0.02)


@pytest.mark.parametrize('k', [0, 2, -1])
def test_bad_pool_size(k):
    with pytest.raises(ValueError, match='pool_size'):
        visattn.create_attn('poolformer', 8, pool_size=k)


def test_bad_input():
    with pytest.raises(ValueError, match='PoolMixer'):
        visattn.create_attn('poolformer', 8)(torch.randn(8, 5, 5))


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
def test_scripts():
    m = visattn.create_attn('poolformer', 8)
    x = torch.randn(2, 8, 5, 7)
    torch.testing.assert_close(torch.jit.script(m)(x), m(x))
