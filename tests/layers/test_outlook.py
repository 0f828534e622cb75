"""Outlook attention (``outlook``): a float64 reference written from VOLO's equations (a loop over the window
offsets; output and every gradient at odd sizes incl. 1×1, strides 1, 2 and 3), timm's ``OutlookAttention`` with
the same weights on the permuted map, receptive fields, options, bf16 and bad arguments."""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.models.volo import OutlookAttention

import visattn
from visattn.layers import OutlookAttn

sys.path.insert(0, str(Path(__file__).parent))
from _timm_equal import assert_same_function  # noqa: E402
from test_gating_blocks import _check_against_reference, _randomize  # noqa: E402

SIZES = [(7, 9), (13, 17), (1, 1)]


class _TimmNCHW(OutlookAttention):
    """timm's module (channels-last) on an NCHW map, with its own parameter names."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def ref_outlook(x, m):
    """VOLO's outlook attention, written as shifts over the window offsets. Window (u, v) is centred at (s·u, s·v);
    x̄_uv = mean of x over the s×s cell (u, v) inside the map; A_uv = softmax_j((W_A x̄_uv + b_A)[n, a, j] / √d);
    Y[centre + o_a] += Σ_j A_uv[n, a, j] V[centre + o_j] (V = W_v x, zero outside the map, outputs outside it
    dropped); out = W_proj Y + b_proj. Offsets o_a run row-major over the k×k window."""
    p = dict(m.named_parameters())
    B, C, H, W = x.shape
    N, k, s = m.num_heads, m.kernel_size, m.stride
    D, r, k2 = C // N, k // 2, k * k
    Hc, Wc = math.ceil(H / s), math.ceil(W / s)
    offsets = [(a // k - r, a % k - r) for a in range(k2)]
    # cell means: zero-pad to whole cells, divide each cell's sum by its number of pixels inside the map
    pad = (0, Wc * s - W, 0, Hc * s - H)
    xs, ones = F.pad(x, pad), F.pad(x.new_ones(H, W), pad)
    cell = sum(xs[..., a::s, b::s] for a in range(s) for b in range(s))
    cell = cell / sum(ones[a::s, b::s] for a in range(s) for b in range(s))  # [B, C, Hc, Wc]
    logits = torch.einsum('oc,bcuw->bouw', p['attn.weight'], cell) + p['attn.bias'][:, None, None]
    attn = torch.softmax(logits.view(B, N, k2, k2, Hc, Wc) / math.sqrt(D), dim=3)  # [B, N, a, j, Hc, Wc]
    v = torch.einsum('oc,bchw->bohw', p['v.weight'], x)
    if 'v.bias' in p:
        v = v + p['v.bias'][:, None, None]
    vp = F.pad(v, (r, r, r, r))
    vals = torch.stack([vp[:, :, di + r:di + r + s * (Hc - 1) + 1:s, dj + r:dj + r + s * (Wc - 1) + 1:s]
                        for di, dj in offsets], 2).view(B, N, D, k2, Hc, Wc)  # V[centre + o_j]
    outs = torch.einsum('bnajuw,bndjuw->bnaduw', attn, vals)  # Σ_j A[n, a, j] V[centre + o_j]
    y = x.new_zeros(B, C, Hc * s + 2 * r, Wc * s + 2 * r)  # the output, padded by r on every side
    for a, (di, dj) in enumerate(offsets):
        out = outs[:, :, a].reshape(B, C, Hc, Wc)
        spread = x.new_zeros(B, C, Hc, s, Wc, s)
        spread[:, :, :, 0, :, 0] = out  # window (u, v) lands at row s·u + di, column s·v + dj
        y = y + F.pad(spread.reshape(B, C, Hc * s, Wc * s), (dj + r, r - dj, di + r, r - di))
    y = y[:, :, r:r + H, r:r + W]
    return torch.einsum('oc,bchw->bohw', p['proj.weight'], y) + p['proj.bias'][:, None, None]


@pytest.mark.parametrize('hw', SIZES)
@pytest.mark.parametrize('stride', [1, 2])
def test_reference(hw, stride):
    m = visattn.create_attn('outlook', 16, num_heads=4, stride=stride)
    _check_against_reference(m, ref_outlook, torch.randn(2, 16, *hw))


@pytest.mark.parametrize('kwargs,hw', [
    (dict(kernel_size=5, num_heads=2), (7, 9)), (dict(kernel_size=1), (5, 6)), (dict(qkv_bias=True), (5, 6)),
    (dict(stride=3), (7, 8)), (dict(kernel_size=5, stride=2, padding=2), (6, 9)),
])
def test_options_reference(kwargs, hw):
    m = visattn.create_attn('outlook', 16, **{'num_heads': 4, **kwargs})
    _check_against_reference(m, ref_outlook, torch.randn(2, 16, *hw), training=True)


@pytest.mark.parametrize('hw', SIZES + [(6, 8)])
@pytest.mark.parametrize('stride,qkv_bias', [(1, False), (2, True), (3, False)])
def test_matches_timm(hw, stride, qkv_bias):
    """Same state dict, same function on the NCHW map, also where the stride does not divide H or W (timm pools in
    ceil mode and unfolds ceil(H/s) windows: the same grid)."""
    torch.manual_seed(0)
    theirs = _randomize(_TimmNCHW(24, 3, stride=stride, qkv_bias=qkv_bias))
    ours = OutlookAttn(24, num_heads=3, stride=stride, qkv_bias=qkv_bias)
    assert_same_function(ours, theirs, torch.randn(2, 24, *hw), out_tol=1e-12, grad_tol=1e-10)


def _expected_moved(H, W, i, j, k, s):
    """Outputs reached from input (i, j): windows whose values include (i, j), or whose weights come from the cell
    holding it; each reaches its k×k positions."""
    r = k // 2
    moved = torch.zeros(H, W, dtype=torch.bool)
    for u in range(math.ceil(H / s)):
        for w in range(math.ceil(W / s)):
            if (abs(s * u - i) <= r and abs(s * w - j) <= r) or (u == i // s and w == j // s):
                moved[max(0, s * u - r):s * u + r + 1, max(0, s * w - r):s * w + r + 1] = True
    return moved


@pytest.mark.parametrize('k,s,pos', [(3, 1, (4, 5)), (3, 1, (0, 10)), (5, 1, (6, 2)), (3, 2, (5, 4)), (3, 2, (4, 7))])
def test_receptive_field(k, s, pos):
    """Perturbing one input pixel moves exactly the outputs predicted by the windows touching it: for stride 1 the
    (2·(k//2) + 1)² square around it (weights and values both come from neighbours)."""
    torch.manual_seed(0)
    H, W = 11, 12
    m = _randomize(OutlookAttn(8, num_heads=2, kernel_size=k, stride=s)).double().eval()
    x = torch.randn(1, 8, H, W, dtype=torch.float64)
    x2 = x.clone()
    x2[:, :, pos[0], pos[1]] += 1
    moved = (m(x2) - m(x)).abs().amax((0, 1)) > 1e-13
    want = _expected_moved(H, W, *pos, k, s)
    if s == 1:
        rows, cols = torch.arange(H)[:, None], torch.arange(W)[None, :]
        assert torch.equal(want, ((rows - pos[0]).abs() <= 2 * (k // 2)) & ((cols - pos[1]).abs() <= 2 * (k // 2)))
    assert torch.equal(moved, want)


def test_dropout_in_training_only():
    m = visattn.create_attn('outlook', 16, num_heads=4, attn_drop=0.5, proj_drop=0.5)
    x = torch.randn(2, 16, 5, 6)
    torch.manual_seed(0)
    a = m.train()(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, m(x))
    m.eval()
    torch.testing.assert_close(m(x), m(x))


def test_timm_parameter_shapes():
    m = OutlookAttn(64, num_heads=2, kernel_size=3)
    assert m.attn.weight.shape == (81 * 2, 64) and m.v.bias is None and m.proj.bias.shape == (64,)


def test_autocast_bf16():
    torch.manual_seed(0)
    m = _randomize(visattn.create_attn('outlook', 32, num_heads=4, stride=2)).train()
    x = torch.randn(3, 32, 7, 9, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    want = m(x)
    assert (y.float() - want).norm() <= 0.02 * want.norm()
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    mb = visattn.create_attn('outlook', 32, num_heads=4, dtype=torch.bfloat16)
    assert mb(x.detach().bfloat16()).dtype == torch.bfloat16


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
def test_scripts():
    m = _randomize(visattn.create_attn('outlook', 16, num_heads=4, stride=2, dtype=torch.float64)).eval()
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(torch.jit.script(m)(x), m(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('kwargs,arg', [
    (dict(padding=0), 'padding'), (dict(kernel_size=5, padding=1), 'padding'), (dict(padding=-1), 'padding'),
    (dict(kernel_size=4), 'kernel_size'), (dict(num_heads=3), 'num_heads'), (dict(stride=0), 'stride'),
    (dict(attn_drop=1.5), 'attn_drop'),
])
def test_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        visattn.create_attn('outlook', 16, **{'num_heads': 4, **kwargs})


def test_bad_input():
    with pytest.raises(ValueError, match='OutlookAttn'):
        visattn.create_attn('outlook', 16)(torch.randn(2, 16, 5))
