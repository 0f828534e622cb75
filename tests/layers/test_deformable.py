"""DAT's deformable attention against a float64 reference written from the paper's equations and the released
code's conventions: the offset network with a hand-written LayerNorm, bilinear samples computed by hand from the four
neighbours (no grid_sample; align_corners=True, zeros outside), the relative table sampled the same way, and dense
softmax attention; output and every gradient at 7×9, 13×17 and 1×1. Also: zero offsets sample the reference grid, the
output moves smoothly with the offsets, the offset range, the table at the size it was built for, options, TorchScript,
bf16 and bad arguments."""

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from visattn.layers import DeformableAttn

sys.path.insert(0, str(Path(__file__).parent))
from _random_params import randomize  # noqa: E402


def _random(m: DeformableAttn, scale: float = 0.5) -> DeformableAttn:
    return randomize(m, scale, lambda name, p: name.endswith('norm.weight')).eval()


def bilinear(img, gy, gx):
    """img [c, H, W] at normalised points (gy, gx) [P] (-1 and 1 are the centres of the border pixels), pixels
    outside the map are zero: [c, P]. The weighted sum of the four neighbours."""
    c, H, W = img.shape
    py, px = (gy + 1) / 2 * (H - 1), (gx + 1) / 2 * (W - 1)
    y0, x0 = torch.floor(py), torch.floor(px)
    out = img.new_zeros(c, gy.numel())
    for dy in (0, 1):
        for dx in (0, 1):
            yy, xx = y0 + dy, x0 + dx
            w = (1 - (py - yy).abs()) * (1 - (px - xx).abs())
            inside = (yy >= 0) & (yy <= H - 1) & (xx >= 0) & (xx <= W - 1)
            yi, xi = yy.clamp(0, H - 1).long(), xx.clamp(0, W - 1).long()
            out = out + img[:, yi, xi] * (w * inside)
    return out


def _conv1x1(z, conv):
    return torch.einsum('oc,c...->o...', conv.weight.flatten(1), z) + conv.bias.view(-1, *[1] * (z.dim() - 1))


def ref_points(z, m):
    """Sampling points [G, Hk, Wk, 2] (y, x) of one image's queries z [C, H, W]: the offset network, tanh, range."""
    G, Cg = m.n_groups, m.group_channels
    dw, ln, last = m.conv_offset[0], m.conv_offset[1].norm, m.conv_offset[3]
    h = F.conv2d(z.view(G, Cg, *z.shape[1:]), dw.weight, dw.bias, stride=m.stride, padding=m.kernel_size // 2,
                 groups=Cg)  # [G, Cg, Hk, Wk]
    mu, var = h.mean(1, keepdim=True), h.var(1, unbiased=False, keepdim=True)
    h = (h - mu) / torch.sqrt(var + ln.eps) * ln.weight[:, None, None] + ln.bias[:, None, None]
    h = 0.5 * h * (1 + torch.erf(h / 2 ** 0.5))
    off = torch.einsum('oc,gchw->ghwo', last.weight.flatten(1), h)  # [G, Hk, Wk, 2]
    Hk, Wk = off.shape[1:3]
    ry = torch.tensor([(2 * i + 1) / Hk - 1 for i in range(Hk)], dtype=z.dtype)
    rx = torch.tensor([(2 * j + 1) / Wk - 1 for j in range(Wk)], dtype=z.dtype)
    ref = torch.stack([ry[:, None].expand(Hk, Wk), rx[None, :].expand(Hk, Wk)], -1)
    s = m.offset_range_factor
    return ref + torch.tanh(off) * torch.tensor([s / Hk, s / Wk], dtype=z.dtype)


def ref_deformable(x, m):
    """One image x [C, H, W]."""
    C, H, W = x.shape
    G, N, D, Cg = m.n_groups, m.num_heads, m.head_dim, m.group_channels
    q = _conv1x1(x, m.proj_q)
    pos = ref_points(q, m)  # [G, Hk, Wk, 2]
    Ns = pos.shape[1] * pos.shape[2]
    sampled = torch.cat([bilinear(x[g * Cg:(g + 1) * Cg], pos[g, ..., 0].flatten(), pos[g, ..., 1].flatten())
                         for g in range(G)])  # [C, Ns]
    k, v = _conv1x1(sampled, m.proj_k), _conv1x1(sampled, m.proj_v)
    qy = torch.tensor([(2 * i + 1) / H - 1 for i in range(H)], dtype=x.dtype)[:, None].expand(H, W).flatten()
    qx = torch.tensor([(2 * j + 1) / W - 1 for j in range(W)], dtype=x.dtype)[None, :].expand(H, W).flatten()
    out = torch.zeros(C, H * W, dtype=x.dtype)
    for n in range(N):
        g = n // (N // G)
        sl = slice(n * D, (n + 1) * D)
        logits = q[sl].flatten(1).T @ k[sl] / D ** 0.5  # [HW, Ns]
        if m.use_pe:
            dy = (qy[:, None] - pos[g, ..., 0].flatten()[None]) / 2
            dx = (qx[:, None] - pos[g, ..., 1].flatten()[None]) / 2
            logits = logits + bilinear(m.rpe_table[n:n + 1], dy.flatten(), dx.flatten()).view(H * W, Ns)
        out[sl] = v[sl] @ torch.softmax(logits, -1).T
    return _conv1x1(out.view(C, H, W), m.proj_out)


CASES = {
    'table_size': (dict(channels=8, num_heads=2, n_groups=2, kernel_size=3, feat_size=(7, 9)), (7, 9)),
    'interp_r2': (dict(channels=8, num_heads=4, n_groups=1, stride=2, offset_range_factor=3.0), (13, 17)),
    'pixel': (dict(channels=8, num_heads=2, n_groups=1, kernel_size=3, feat_size=3), (1, 1)),
    'no_pe_r3': (dict(channels=8, num_heads=4, n_groups=4, stride=3, use_pe=False), (7, 9)),
}


@pytest.mark.parametrize('case', list(CASES))
def test_matches_reference_output_and_gradients(case):
    kwargs, hw = CASES[case]
    torch.manual_seed(0)
    m = _random(DeformableAttn(**kwargs, dtype=torch.float64))
    x = torch.randn(2, m.channels, *hw, dtype=torch.float64, requires_grad=True)
    y = m(x)
    y_ref = torch.stack([ref_deformable(xi, m) for xi in x])
    assert y.shape == y_ref.shape == x.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    names, params = zip(*[('x', x), *m.named_parameters()])
    grads = torch.autograd.grad(y, params, g)
    grads_ref = torch.autograd.grad(y_ref, params, g)
    for name, a, b in zip(names, grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=lambda msg, n=name: f'{n}: {msg}')
    # a 1×1 map has one key (softmax weight 1) sampled exactly at its pixel: only the value path has gradients
    live = [n for n in names if hw != (1, 1) or n == 'x' or n.startswith(('proj_v', 'proj_out'))]
    assert all(a.abs().sum() > 0 for n, a in zip(names, grads) if n in live)


def test_bilinear_reference_is_grid_sample():
    """The hand-written sampler is grid_sample(bilinear, zeros, align_corners=True), points outside included."""
    torch.manual_seed(0)
    img = torch.randn(3, 5, 7, dtype=torch.float64)
    pts = torch.rand(40, 2, dtype=torch.float64) * 2.6 - 1.3
    want = F.grid_sample(img[None], pts.flip(-1).view(1, 1, 40, 2), align_corners=True)[0, :, 0]
    torch.testing.assert_close(bilinear(img, pts[:, 0], pts[:, 1]), want)


@pytest.mark.parametrize('stride, hw', [(1, (7, 9)), (2, (7, 9)), (3, (13, 17)), (1, (1, 1))])
def test_zero_offsets_sample_the_reference_grid(stride, hw):
    """With the offset network's last conv zeroed the points are the cell centres of the ceil(H/r) × ceil(W/r) grid,
    and the keys are bilinear samples of the map there."""
    torch.manual_seed(0)
    m = _random(DeformableAttn(8, num_heads=2, n_groups=2, stride=stride, dtype=torch.float64))
    with torch.no_grad():
        m.conv_offset[3].weight.zero_()
    x = torch.randn(2, 8, *hw, dtype=torch.float64)
    pos = m.sampling_points(x)
    Hk, Wk = -(-hw[0] // stride), -(-hw[1] // stride)
    assert pos.shape == (2, 2, Hk, Wk, 2)
    ys = (torch.arange(Hk, dtype=torch.float64) + 0.5) / Hk * 2 - 1
    xs = (torch.arange(Wk, dtype=torch.float64) + 0.5) / Wk * 2 - 1
    grid = torch.stack(torch.meshgrid(ys, xs, indexing='ij'), -1)
    torch.testing.assert_close(pos, grid.expand_as(pos), rtol=0, atol=1e-15)
    torch.testing.assert_close(m(x), torch.stack([ref_deformable(xi, m) for xi in x]), rtol=1e-10, atol=1e-10)


def test_output_moves_smoothly_with_the_offsets():
    """Scaling the last offset conv by t moves the output continuously and linearly to first order, and the output
    is differentiable in that weight (gradcheck)."""
    torch.manual_seed(0)
    m = _random(DeformableAttn(8, num_heads=2, n_groups=2, feat_size=(6, 7), dtype=torch.float64))
    w0 = m.conv_offset[3].weight.detach().clone()
    x = torch.randn(1, 8, 6, 7, dtype=torch.float64)

    def run(w):
        return torch.func.functional_call(m, {'conv_offset.3.weight': w}, (x,))

    y0 = run(0 * w0)
    d1, d2 = (run(1e-4 * w0) - y0).norm(), (run(2e-4 * w0) - y0).norm()
    assert d1 > 0 and abs(d2 / d1 - 2) < 1e-2
    assert (run(w0) - y0).abs().max() > 1e-3  # the offsets matter
    assert torch.autograd.gradcheck(run, (w0.clone().requires_grad_(),), eps=1e-6, atol=1e-6, fast_mode=True)


def test_offsets_stay_in_range():
    """|Δp| <= s / H_k, s / W_k, and large offset logits reach the bound (tanh)."""
    torch.manual_seed(0)
    m = _random(DeformableAttn(8, num_heads=2, n_groups=2, stride=2, offset_range_factor=1.5, dtype=torch.float64))
    with torch.no_grad():
        m.conv_offset[3].weight.mul_(1e3)
    x = torch.randn(2, 8, 9, 11, dtype=torch.float64)
    pos = m.sampling_points(x)
    Hk, Wk = 5, 6
    ys = (torch.arange(Hk, dtype=torch.float64) + 0.5) / Hk * 2 - 1
    xs = (torch.arange(Wk, dtype=torch.float64) + 0.5) / Wk * 2 - 1
    off = pos - torch.stack(torch.meshgrid(ys, xs, indexing='ij'), -1)
    bound = torch.tensor([1.5 / Hk, 1.5 / Wk], dtype=torch.float64)
    assert (off.abs() <= bound + 1e-12).all()
    assert (off.abs().amax((0, 1, 2, 3)) > 0.999 * bound).all()


def test_relative_bias_at_the_table_size():
    """At the size the table is built for, a query and a key at the same place read the table's centre, and a key
    one cell to the right reads one column left of it (the released indexing)."""
    torch.manual_seed(0)
    m = DeformableAttn(8, num_heads=2, n_groups=1, feat_size=(5, 7), dtype=torch.float64)
    with torch.no_grad():
        m.rpe_table.normal_()
    ys = (torch.arange(5, dtype=torch.float64) + 0.5) / 5 * 2 - 1
    xs = (torch.arange(7, dtype=torch.float64) + 0.5) / 7 * 2 - 1
    pos = torch.stack(torch.meshgrid(ys, xs, indexing='ij'), -1)[None]  # the reference grid, r = 1
    bias = m.relative_bias(pos, 5, 7)  # [1, 2, 35, 35]
    assert bias.shape == (1, 2, 35, 35)
    diag = bias[0].diagonal(dim1=-2, dim2=-1)  # [2, 35]: q̂_m = p_m
    torch.testing.assert_close(diag, m.rpe_table[:, 4, 6, None].expand(2, 35))
    # query (2, 3), key (2, 4): displacement -1/7 in x -> table column 6 - 6/7 (bilinear between 5 and 6)
    want = m.rpe_table[:, 4, 5] / 7 * 6 + m.rpe_table[:, 4, 6] / 7
    torch.testing.assert_close(bias[0, :, 2 * 7 + 3, 2 * 7 + 4], want)
    assert DeformableAttn(8, use_pe=False).relative_bias(pos, 5, 7) is None


def test_state_dict_has_the_released_names():
    m = DeformableAttn(16, num_heads=4, n_groups=2, feat_size=(7, 9))
    assert set(m.state_dict()) == {
        'conv_offset.0.weight', 'conv_offset.0.bias', 'conv_offset.1.norm.weight', 'conv_offset.1.norm.bias',
        'conv_offset.3.weight', 'proj_q.weight', 'proj_q.bias', 'proj_k.weight', 'proj_k.bias', 'proj_v.weight',
        'proj_v.bias', 'proj_out.weight', 'proj_out.bias', 'rpe_table'}
    assert m.rpe_table.shape == (4, 13, 17) and m.conv_offset[0].weight.shape == (8, 1, 5, 5)
    assert 'rpe_table' not in DeformableAttn(16, num_heads=4, use_pe=False).state_dict()


def test_scripted_equals_eager():
    torch.manual_seed(0)
    m = _random(DeformableAttn(8, num_heads=2, n_groups=2, stride=2, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        scripted = torch.jit.script(m)
    x = torch.randn(2, 8, 7, 9, dtype=torch.float64)
    torch.testing.assert_close(scripted(x), m(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('with_bias', [True, False])
def test_fused_and_plain_attention_agree(with_bias):
    """The GPU path (scaled_dot_product_attention) and the CPU path compute the same attention and gradients."""
    from visattn.layers.deformable import attend

    torch.manual_seed(0)
    q = torch.randn(2, 3, 10, 4, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 3, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    bias = torch.randn(2, 3, 10, 6, dtype=torch.float64, requires_grad=True) if with_bias else None
    inputs = [t for t in (q, k, v, bias) if t is not None]
    fused, plain = attend(q, k, v, bias, 0.7, fused=True), attend(q, k, v, bias, 0.7, fused=False)
    logits = q @ k.transpose(-1, -2) * 0.7 + (0 if bias is None else bias)
    torch.testing.assert_close(plain, torch.softmax(logits, -1) @ v)
    torch.testing.assert_close(fused, plain)
    g = torch.randn_like(plain)
    for a, b in zip(torch.autograd.grad(fused, inputs, g), torch.autograd.grad(plain, inputs, g)):
        torch.testing.assert_close(a, b)


def test_bf16_follows_float32():
    torch.manual_seed(0)
    m32 = DeformableAttn(32).eval()
    m16 = DeformableAttn(32, dtype=torch.bfloat16).eval()
    m16.load_state_dict(m32.state_dict())
    x = torch.randn(2, 32, 7, 9)
    with torch.no_grad():
        y16, y32 = m16(x.bfloat16()), m32(x)
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
    assert (y16.float() - y32).abs().mean() < 0.05 * y32.abs().mean()


@pytest.mark.parametrize('make, error, words', [
    (lambda: DeformableAttn(16, num_heads=3), ValueError, 'num_heads'),
    (lambda: DeformableAttn(16, num_heads=4, n_groups=3), ValueError, 'n_groups'),
    (lambda: DeformableAttn(16, kernel_size=4), ValueError, 'kernel_size'),
    (lambda: DeformableAttn(16, offset_range_factor=0), ValueError, 'offset_range_factor'),
    (lambda: DeformableAttn(16, stride=0), ValueError, 'stride'),
    (lambda: DeformableAttn(16, feat_size=(4, 0)), ValueError, 'feat_size'),
    (lambda: DeformableAttn(16, feat_size=(4, 4, 4)), ValueError, 'feat_size'),
    (lambda: DeformableAttn(16, feat_size=4.0), TypeError, 'feat_size'),
    (lambda: DeformableAttn(16.0), TypeError, 'channels'),
])
def test_bad_arguments(make, error, words):
    with pytest.raises(error, match=words):
        make()


def test_bad_input():
    m = DeformableAttn(16)
    with pytest.raises(ValueError, match='channels'):
        m(torch.randn(1, 8, 5, 5))
    with pytest.raises(ValueError, match='4 dims'):
        m(torch.randn(16, 5, 5))
