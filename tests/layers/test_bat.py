"""BatNonLocalAttn: a float64 reference written from the paper's equations with the explicit H×H and W×W block
matrices P ⊗ I_t and Q ⊗ I_t' (on the zero-padded map, padding-only bands masked), timm's BatNonLocalAttn where b
divides H and W, options and errors."""

import math
import sys
from pathlib import Path

import pytest
import torch
from timm.layers.non_local_attn import BatNonLocalAttn as TimmBat

from visattn.layers import BatNonLocalAttn

sys.path.insert(0, str(Path(__file__).parent))
from _random_params import randomize  # noqa: E402
from _timm_equal import assert_same_function  # noqa: E402


def _cna(t, P, name, training):
    """1×1 conv, batch norm, ReLU."""
    y = torch.einsum('oc,bchw->bohw', P[f'{name}.conv.weight'][:, :, 0, 0], t)
    if training:
        mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
    else:
        mean, var = P[f'{name}.bn.running_mean'], P[f'{name}.bn.running_var']
    y = (y - mean[:, None, None]) / (var[:, None, None] + 1e-5).sqrt()
    return torch.relu(y * P[f'{name}.bn.weight'][:, None, None] + P[f'{name}.bn.bias'][:, None, None])


def bat_reference(x, P, *, block, groups, training=False):
    """x + conv2(BA(conv1(x))) with BA(z) = conv2'((P ⊗ I_t) z (Q ⊗ I_t')) per group (no dropout)."""
    z = _cna(x, P, 'conv1', training)
    B, Cr, H, W = z.shape
    b, G = block, groups
    th, tw = math.ceil(H / b), math.ceil(W / b)
    u = _cna(z, P, 'ba.conv1', training)
    rows = torch.zeros(B, G, b, dtype=x.dtype)  # band maxima over image pixels; padding-only bands: 0
    cols = torch.zeros(B, G, b, dtype=x.dtype)
    for i in range(b):
        if i * th < H:
            rows[:, :, i] = u[:, :, i * th:(i + 1) * th].amax((2, 3))
        if i * tw < W:
            cols[:, :, i] = u[:, :, :, i * tw:(i + 1) * tw].amax((2, 3))
    wp, wq = P['ba.conv_p.weight'][..., 0], P['ba.conv_q.weight'][:, :, 0]  # [b²G, G, b]
    p = torch.sigmoid(torch.einsum('ogb,xgb->xo', wp, rows) + P['ba.conv_p.bias']).reshape(B, G, b, b)
    q = torch.sigmoid(torch.einsum('ogb,xgb->xo', wq, cols) + P['ba.conv_q.bias']).reshape(B, G, b, b)
    p = p * (torch.arange(b) * th < H).to(x.dtype)  # P_ij: no weight on padding-only source bands j
    q = q * (torch.arange(b) * tw < W).to(x.dtype)[:, None]
    p, q = p / p.sum(3, keepdim=True), q / q.sum(2, keepdim=True)
    Pb = torch.kron(p, torch.eye(th, dtype=x.dtype))  # [B, G, b·th, b·th]: row i·t + a <- row j·t + a
    Qb = torch.kron(q, torch.eye(tw, dtype=x.dtype))
    zp = torch.nn.functional.pad(z, (0, b * tw - W, 0, b * th - H)).reshape(B, G, Cr // G, b * th, b * tw)
    y = (Pb[:, :, None] @ zp @ Qb[:, :, None]).reshape(B, Cr, b * th, b * tw)[:, :, :H, :W]
    return x + _cna(_cna(y, P, 'ba.conv2', training), P, 'conv2', training)


def _block(**kw):
    torch.manual_seed(0)
    m = BatNonLocalAttn(16, dtype=torch.float64, **dict(dict(drop_rate=0.), **kw))
    return randomize(m, 0.3, lambda n, p: p.dim() == 1 and n.endswith('weight'))


def _check(m, x, training):
    m.train(training)
    P = dict(m.state_dict())
    P.update(dict(m.named_parameters()))
    xs = [x.clone().requires_grad_() for _ in range(2)]
    out = m(xs[0])
    want = bat_reference(xs[1], P, block=m.ba.block_size, groups=m.ba.groups, training=training)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    names = [n for n, _ in m.named_parameters()]
    got = torch.autograd.grad(out, [xs[0]] + [p for _, p in m.named_parameters()], g)
    exp = torch.autograd.grad(want, [xs[1]] + [P[n] for n in names], g)
    for name, a, b in zip(['x'] + names, got, exp):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f'gradient of {name}')


@pytest.mark.parametrize('training', [False, True])
@pytest.mark.parametrize('block, hw', [(3, (7, 9)), (7, (14, 7)), (3, (13, 17)), (7, (5, 6)), (3, (1, 1)),
                                       (4, (9, 5))],
                         ids=['3-7x9', '7-divisible', '3-13x17', '7-smaller-map', '3-1x1', '4-empty-bands'])
def test_matches_reference(block, hw, training):
    torch.manual_seed(1)
    _check(_block(block_size=block), torch.randn(2, 16, *hw, dtype=torch.float64), training)


def test_padding_only_bands_get_no_weight():
    """A 5×5 map with b = 7: bands 5 and 6 are padding only; their pooled descriptors are 0 and the output is
    finite (their weights are masked out of the normalisation, which the reference checks)."""
    m = _block(block_size=7).eval()
    x = torch.randn(1, 16, 5, 5, dtype=torch.float64)
    y = m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    ba = m.ba
    seen = {}

    def hook(mod, inp, out):
        seen['rows'] = inp[0]

    ba.conv_p.register_forward_hook(hook)
    m(x)
    assert (seen['rows'][0, :, 5:] == 0).all() and (seen['rows'][0, :, :5] != 0).any()


@pytest.mark.parametrize('block, groups, hw', [(7, 2, (7, 14)), (3, 4, (9, 6)), (2, 2, (4, 8))])
def test_equals_timm_where_the_block_divides_the_map(block, groups, hw):
    torch.manual_seed(0)
    theirs = TimmBat(32, block_size=block, groups=groups, drop_rate=0.)
    randomize(theirs, 0.3, lambda n, p: p.dim() == 1 and n.endswith('weight'))
    ours = BatNonLocalAttn(32, block_size=block, groups=groups, drop_rate=0.)
    for training in (False, True):
        assert_same_function(ours, theirs, torch.randn(2, 32, *hw), training=training)


def test_runs_where_timm_asserts():
    theirs, ours = TimmBat(16).eval(), BatNonLocalAttn(16).eval()
    x = torch.randn(2, 16, 5, 9)
    with pytest.raises(AssertionError):
        theirs(x)
    assert ours(x).shape == x.shape


def test_defaults_and_dropout():
    m = BatNonLocalAttn(64)
    assert (m.ba.block_size, m.ba.groups, m.ba.in_channels, m.dropout.p) == (7, 2, 16, 0.2)
    assert BatNonLocalAttn(20).ba.in_channels == 8  # timm's rounding: 5 -> 8
    torch.manual_seed(0)
    m = BatNonLocalAttn(16, drop_rate=0.5).train()
    x = torch.randn(4, 16, 7, 7)
    y = m(x)
    dropped = ((y - x).abs().amax((2, 3)) == 0)
    assert dropped.any() and not dropped.all()


@pytest.mark.parametrize('kwargs, match', [
    (dict(groups=3), 'groups'), (dict(drop_rate=1.5), 'drop_rate'), (dict(block_size=0), 'block_size'),
    (dict(rd_channels=0), 'rd_channels'), (dict(rd_ratio=2.0), 'rd_ratio'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        BatNonLocalAttn(16, **kwargs)


def test_wrong_input():
    with pytest.raises(ValueError, match='BatNonLocalAttn'):
        BatNonLocalAttn(16)(torch.randn(2, 8, 5, 5))


def test_bfloat16():
    torch.manual_seed(4)
    m = _block(block_size=3).float().eval()
    x = torch.randn(2, 16, 7, 9)
    y = m.to(torch.bfloat16)(x.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), m.float()(x), rtol=0.1, atol=0.1)


def test_torchscript():
    m = _block(block_size=3).eval()
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64)
    scripted = torch.jit.script(m)
    torch.testing.assert_close(scripted(x), m(x))
