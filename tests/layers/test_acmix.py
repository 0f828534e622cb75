"""ACmix against a float64 reference written from the paper's equations and the released code's conventions (an
explicit loop over query positions gathering each reflected window, and an explicit loop over the kernel positions of
the shifted convolution path), output and every gradient; odd sizes, maps smaller than the window, stride, the mask
pad mode, the receptive field, initialisation, TorchScript, bf16 and bad arguments."""

import sys
import warnings
from pathlib import Path

import pytest
import torch

from visattn.layers import ACmix

sys.path.insert(0, str(Path(__file__).parent))
from _random_params import randomize  # noqa: E402


def _random(m: ACmix) -> ACmix:
    return randomize(m, 0.4, lambda name, p: False).eval()


def _proj(x, conv):
    """1×1 convolution of x [C, H, W] by weight [O, C, 1, 1] and bias [O]."""
    return torch.einsum('oc,chw->ohw', conv.weight.flatten(1), x) + conv.bias[:, None, None]


def _reflect(i: int, n: int) -> int:
    """Index i reflected (repeatedly) into 0 .. n-1 about the border pixels, as ReflectionPad2d."""
    if n == 1:
        return 0
    while i < 0 or i >= n:
        i = -i if i < 0 else 2 * (n - 1) - i
    return i


def ref_acmix(x, m):
    """One image x [C, H, W]: α · (local attention with the coordinate encoding) + β · (fc, shifts, sum)."""
    N, D, s, kc = m.num_heads, m.head_dim, m.stride, m.kernel_conv
    Co, p, pc = m.out_channels, m.kernel_att // 2, m.kernel_conv // 2
    H, W = x.shape[1:]
    Ho, Wo = -(-H // s), -(-W // s)
    q, key, v = _proj(x, m.conv1), _proj(x, m.conv2), _proj(x, m.conv3)
    lx = torch.tensor([-1.0 + 2.0 * j / (W - 1) if W > 1 else -1.0 for j in range(W)], dtype=x.dtype)
    ly = torch.tensor([-1.0 + 2.0 * i / (H - 1) if H > 1 else -1.0 for i in range(H)], dtype=x.dtype)
    wp = m.conv_p.weight.flatten(1)
    pe = wp[:, 0, None, None] * lx[None, None, :] + wp[:, 1, None, None] * ly[None, :, None] \
        + m.conv_p.bias[:, None, None]  # [D, H, W]

    att = torch.zeros(Co, Ho, Wo, dtype=x.dtype)
    for io in range(Ho):
        for jo in range(Wo):
            i, j = s * io, s * jo
            rows, cols = [], []
            for a in range(-p, p + 1):
                for b in range(-p, p + 1):
                    if m.pad_mode == 'reflect':
                        rows.append(_reflect(i + a, H))
                        cols.append(_reflect(j + b, W))
                    elif 0 <= i + a < H and 0 <= j + b < W:
                        rows.append(i + a)
                        cols.append(j + b)
            for n in range(N):
                sl = slice(n * D, (n + 1) * D)
                keys = key[sl][:, rows, cols] + pe[:, i, j, None] - pe[:, rows, cols]  # [D, window]
                w = torch.softmax(q[sl, i, j] @ keys * D ** -0.5, 0)
                att[sl, io, jo] = v[sl][:, rows, cols] @ w

    g = torch.stack([q, key, v]).view(3 * N, D, H, W)  # the 3N head features of each head channel d
    f = torch.einsum('tc,cdhw->dthw', m.fc.weight.flatten(1), g)  # [D, kc², H, W]
    f = torch.nn.functional.pad(f, (pc, pc, pc, pc))
    conv = m.dep_conv.bias[:, None, None].expand(Co, Ho, Wo).clone()
    wd = m.dep_conv.weight  # [Co, kc², kc, kc]; outputs d·N .. d·N + N - 1 read head channel d
    for d in range(D):
        out = slice(d * N, (d + 1) * N)
        for t in range(kc * kc):
            for u in range(kc):
                for w_ in range(kc):
                    shifted = f[d, t, u:u + s * (Ho - 1) + 1:s, w_:w_ + s * (Wo - 1) + 1:s]
                    conv[out] += wd[out, t, u, w_, None, None] * shifted
    return m.rate1 * att + m.rate2 * conv


CASES = {
    'k5': (dict(channels=8, out_channels=8, kernel_att=5, num_heads=2), (7, 9)),
    'k7': (dict(channels=6, out_channels=8, kernel_att=7, num_heads=2), (7, 9)),
    'k3_s2': (dict(channels=8, out_channels=12, kernel_att=3, num_heads=3, stride=2), (13, 17)),
    'k5_kc5': (dict(channels=6, out_channels=8, kernel_att=5, num_heads=4, kernel_conv=5), (7, 9)),
    'pixel': (dict(channels=8, out_channels=8, kernel_att=5, num_heads=2), (1, 1)),
    'folded': (dict(channels=6, out_channels=8, kernel_att=7, num_heads=2), (2, 3)),  # sides <= k_att // 2
    'mask_s2': (dict(channels=8, out_channels=8, kernel_att=5, num_heads=2, stride=2, pad_mode='mask'), (7, 9)),
    'mask_pixel': (dict(channels=8, out_channels=8, kernel_att=3, num_heads=2, pad_mode='mask'), (1, 1)),
}


SLOW = {'k7', 'k5_kc5', 'mask_pixel'}


@pytest.mark.parametrize('case', [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES])
def test_matches_reference_output_and_gradients(case):
    kwargs, hw = CASES[case]
    torch.manual_seed(0)
    m = _random(ACmix(**kwargs, dtype=torch.float64))
    x = torch.randn(2, m.channels, *hw, dtype=torch.float64, requires_grad=True)
    y = m(x)
    y_ref = torch.stack([ref_acmix(xi, m) for xi in x])
    s = m.stride
    assert y.shape == y_ref.shape == (2, m.out_channels, -(-hw[0] // s), -(-hw[1] // s))
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    names, params = zip(*[('x', x), *m.named_parameters()])
    grads = torch.autograd.grad(y, params, g)
    grads_ref = torch.autograd.grad(y_ref, params, g)
    for name, a, b in zip(names, grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda msg, n=name: f'{n}: {msg}')
    assert grads[0].abs().sum() > 0


def test_reference_padding_is_reflection_pad():
    """The reference's window source equals ``ReflectionPad2d`` where that is defined; the module folds further."""
    x = torch.arange(7.).view(1, 1, 1, 7).expand(1, 1, 5, 7)
    padded = torch.nn.ReflectionPad2d(3)(x)[0, 0, 3]
    assert [_reflect(j, 7) for j in range(-3, 10)] == padded.long().tolist()
    from visattn.layers.acmix import _reflect_pad

    small = torch.arange(3.).view(1, 1, 1, 3)
    assert _reflect_pad(small, 3)[0, 0, 0].tolist() == [_reflect(j, 3) for j in range(-3, 6)]


@pytest.mark.parametrize('pad_mode', ['reflect', 'mask'])
def test_receptive_field_is_the_window(pad_mode):
    """Perturbing one pixel moves exactly the outputs within k_att // 2 of it (Chebyshev), corners included."""
    torch.manual_seed(0)
    m = _random(ACmix(8, kernel_att=7, num_heads=2, pad_mode=pad_mode, dtype=torch.float64))
    x = torch.randn(1, 8, 13, 17, dtype=torch.float64)
    y = m(x)
    for r, c in [(6, 8), (0, 0), (12, 3)]:
        x2 = x.clone()
        x2[0, :, r, c] += torch.randn(8, dtype=torch.float64)
        moved = (m(x2) - y).abs().amax((0, 1)) > 0
        rows, cols = torch.meshgrid(torch.arange(13), torch.arange(17), indexing='ij')
        expected = torch.maximum((rows - r).abs(), (cols - c).abs()) <= 3
        assert torch.equal(moved, expected), (r, c)


def test_initialisation_is_the_released_codes():
    m = ACmix(16, kernel_conv=3, num_heads=4)
    assert m.rate1.item() == m.rate2.item() == 0.5
    w = m.dep_conv.weight  # [Co, 9, 3, 3]: input t of each group is shifted from kernel position (t // 3, t % 3)
    assert w.shape == (16, 9, 3, 3) and m.dep_conv.groups == m.head_dim == 4
    assert torch.equal(w, torch.eye(9).view(1, 9, 3, 3).expand(16, -1, -1, -1))
    assert not m.dep_conv.bias.any() and m.dep_conv.weight.requires_grad
    assert m.fc.bias is None and m.fc.weight.shape == (9, 12, 1, 1) and m.conv_p.weight.shape == (4, 2, 1, 1)
    # the released parameter names: its checkpoints load as they are
    assert set(m.state_dict()) == {'rate1', 'rate2', 'conv1.weight', 'conv1.bias', 'conv2.weight', 'conv2.bias',
                                   'conv3.weight', 'conv3.bias', 'conv_p.weight', 'conv_p.bias', 'fc.weight',
                                   'dep_conv.weight', 'dep_conv.bias'}


def test_conv_path_at_init_is_shift_and_sum():
    """With the shift kernels, the convolution path is Σ_t shift_t(f_t) (f_t: the fc features), per head channel."""
    torch.manual_seed(0)
    m = ACmix(4, 4, num_heads=2, dtype=torch.float64)
    with torch.no_grad():
        m.rate1.zero_()
    x = torch.randn(1, 4, 5, 6, dtype=torch.float64)
    qkv = torch.stack([_proj(x[0], c) for c in (m.conv1, m.conv2, m.conv3)]).view(6, 2, 5, 6)
    f = torch.einsum('tc,cdhw->dthw', m.fc.weight.flatten(1), qkv)
    f = torch.nn.functional.pad(f, (1, 1, 1, 1))
    want = sum(f[:, t, t // 3:t // 3 + 5, t % 3:t % 3 + 6] for t in range(9))  # [D, H, W]
    y = m(x)[0]
    torch.testing.assert_close(y, 0.5 * want.repeat_interleave(2, 0))  # output o = d·N + n reads head channel d


def test_fixed_shift_option():
    m = ACmix(8, num_heads=2, learnable_shift=False)
    m(torch.randn(1, 8, 5, 5)).sum().backward()
    assert m.dep_conv.weight.grad is None and m.dep_conv.bias.grad is not None and m.fc.weight.grad is not None


def test_scripted_plain_path_equals_eager():
    """TorchScript runs the plain loop (autograd through the window slices): output and gradients equal the eager
    path with its hand-written backward."""
    torch.manual_seed(0)
    m = _random(ACmix(8, kernel_att=5, num_heads=2, stride=2, pad_mode='mask', dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        scripted = torch.jit.script(m)
    x = torch.randn(2, 8, 7, 9, dtype=torch.float64, requires_grad=True)
    y, ys = m(x), scripted(x)
    torch.testing.assert_close(ys, y, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, [x, *m.parameters()], g),
                    torch.autograd.grad(ys, [x, *m.parameters()], g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(m(x), y)


def test_gradcheck_eager_backward():
    torch.manual_seed(0)
    m = _random(ACmix(4, kernel_att=3, num_heads=2, stride=2, dtype=torch.float64))
    x = torch.randn(1, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-6, fast_mode=True)


def test_bf16_follows_float32():
    torch.manual_seed(0)
    m32 = ACmix(32).eval()
    m16 = ACmix(32, dtype=torch.bfloat16).eval()
    m16.load_state_dict(m32.state_dict())
    x = torch.randn(2, 32, 7, 9)
    with torch.no_grad():
        y16, y32 = m16(x.bfloat16()), m32(x)
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
    assert (y16.float() - y32).abs().mean() < 0.05 * y32.abs().mean()


@pytest.mark.parametrize('make, error, words', [
    (lambda: ACmix(16, kernel_att=6), ValueError, 'kernel_att'),
    (lambda: ACmix(16, kernel_conv=2), ValueError, 'kernel_conv'),
    (lambda: ACmix(16, 18, num_heads=4), ValueError, 'num_heads'),
    (lambda: ACmix(16, num_heads=0), ValueError, 'num_heads'),
    (lambda: ACmix(16, stride=0), ValueError, 'stride'),
    (lambda: ACmix(16, pad_mode='zeros'), ValueError, 'pad_mode'),
    (lambda: ACmix(16.0), TypeError, 'channels'),
    (lambda: ACmix(16, out_channels=0), ValueError, 'out_channels'),
])
def test_bad_arguments(make, error, words):
    with pytest.raises(error, match=words):
        make()


def test_bad_input():
    m = ACmix(16)
    with pytest.raises(ValueError, match='channels'):
        m(torch.randn(1, 8, 5, 5))
    with pytest.raises(ValueError, match='4 dims'):
        m(torch.randn(16, 5, 5))
