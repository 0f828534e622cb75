"""S²-MLP / S²-MLPv2 (``s2mlp``): float64 references with the spatial shift as explicit index shifting and the
split attention as the paper's equations (outputs and every gradient at odd sizes, train and eval), the paper's
in-place pseudo-code, exactly the shifted neighbours moving, options and errors."""

import sys
from pathlib import Path

import pytest
import torch

import visattn
from visattn.layers.s2mlp import spatial_shift

sys.path.insert(0, str(Path(__file__).parent))
from test_gfnet import _random  # noqa: E402

# (dy, dx) of the four groups: out[i, j] = x[i - dy, j - dx]
S1 = [(0, 1), (0, -1), (1, 0), (-1, 0)]
S2 = [(1, 0), (-1, 0), (0, 1), (0, -1)]


def ref_shift(x, offsets):
    """Loops over channels and pixels; group q of channels [q·C/4, (q+1)·C/4) (floors), the pixel keeps its own value
    where the source falls outside the map."""
    B, C, H, W = x.shape
    out = x.clone()
    for c in range(C):
        q = max(q for q in range(4) if C * q // 4 <= c)
        dy, dx = offsets[q]
        for i in range(H):
            for j in range(W):
                si, sj = i - dy, j - dx
                if 0 <= si < H and 0 <= sj < W:
                    out[:, c, i, j] = x[:, c, si, sj]
    return out


def paper_shift(x):
    """The paper's pseudo-code on X ∈ R^{w × h × c} (first index along the width), in place."""
    t = x.permute(0, 3, 2, 1).clone()  # [B, W, H, C]
    w, h, c = t.shape[1:]
    t[:, 1:, :, :c // 4] = t[:, :w - 1, :, :c // 4].clone()
    t[:, :w - 1, :, c // 4:c // 2] = t[:, 1:, :, c // 4:c // 2].clone()
    t[:, :, 1:, c // 2:c * 3 // 4] = t[:, :, :h - 1, c // 2:c * 3 // 4].clone()
    t[:, :, :h - 1, 3 * c // 4:] = t[:, :, 1:, 3 * c // 4:].clone()
    return t.permute(0, 3, 2, 1)


def fc(x, w, b=None):
    y = torch.einsum('oi,bihw->bohw', w.flatten(1), x)
    return y if b is None else y + b[:, None, None]


def gelu(t):
    return 0.5 * t * (1 + torch.erf(t / 2 ** 0.5))


def ref_v1(x, m):
    return fc(ref_shift(gelu(fc(x, m.fc1.weight, m.fc1.bias)), S1), m.fc2.weight, m.fc2.bias)


def ref_v2(x, m, pool='sum'):
    """X = FC1(x) split into X1, X2, X3; X1 <- S1, X2 <- S2; a = Σ_k Σ_n X_k; â = GELU(a W1) W2 -> [3, C];
    ā = softmax over k; y = FC2(Σ_k ā_k X_k)."""
    C = x.shape[1]
    t = fc(x, m.fc1.weight, m.fc1.bias)
    xs = [ref_shift(t[:, :C], S1), ref_shift(t[:, C:2 * C], S2), t[:, 2 * C:]]
    a = sum(xk.sum((2, 3)) for xk in xs)
    if pool == 'mean':
        a = a / (x.shape[2] * x.shape[3])
    hat = gelu(a @ m.attn_fc1.weight.T) @ m.attn_fc2.weight.T
    bar = torch.softmax(hat.view(-1, 3, C), dim=1)
    return fc(sum(bar[:, k, :, None, None] * xs[k] for k in range(3)), m.fc2.weight, m.fc2.bias)


def _check(m, x, ref):
    x = x.double().requires_grad_()
    out, want = m(x), ref(x)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    params = list(m.parameters())
    got = torch.autograd.grad(out, [x] + params, g)
    exp = torch.autograd.grad(want, [x] + params, g)
    for name, a, b in zip(['x'] + [n for n, _ in m.named_parameters()], got, exp):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f'gradient of {name}')


@pytest.mark.parametrize('hw', [(7, 9), (13, 17), (1, 1)])
@pytest.mark.parametrize('channels', [8, 10])
def test_reference_v1(hw, channels):
    m = _random(visattn.create_attn('s2mlp', channels))
    _check(m, torch.randn(2, channels, *hw), lambda x: ref_v1(x, m))


@pytest.mark.parametrize('hw', [(7, 9), (13, 17), (1, 1)])
@pytest.mark.parametrize('pool', ['sum', 'mean'])
def test_reference_v2(hw, pool):
    m = _random(visattn.create_attn('s2mlp', 8, version=2, attn_pool=pool)).train()
    _check(m, torch.randn(2, 8, *hw) * 0.2, lambda x: ref_v2(x, m, pool))


def test_shift_is_the_papers_pseudo_code():
    x = torch.randn(2, 10, 7, 9)
    assert torch.equal(spatial_shift(x), paper_shift(x))
    assert torch.equal(spatial_shift(x), ref_shift(x, S1))
    assert torch.equal(spatial_shift(x, version=2), ref_shift(x, S2))
    torch.testing.assert_close(spatial_shift(x.permute(0, 2, 3, 1), channels_last=True),
                               spatial_shift(x).permute(0, 2, 3, 1))


@pytest.mark.parametrize('version', [1, 2])
@pytest.mark.parametrize('c, pos', [(0, (3, 4)), (2, (3, 8)), (4, (0, 2)), (7, (6, 0)), (1, (3, 0))])
def test_exactly_the_shifted_neighbours_move(version, c, pos):
    """In the shift: the pixel it moves to, and itself where it is the uncovered border that keeps its value."""
    x = torch.randn(1, 8, 7, 9)
    x2 = x.clone()
    x2[0, c, pos[0], pos[1]] += 1.0
    moved = (spatial_shift(x2, version) - spatial_shift(x, version)) != 0
    dy, dx = (S1 if version == 1 else S2)[c // 2]
    want = torch.zeros_like(moved)
    i, j = pos[0] + dy, pos[1] + dx
    if 0 <= i < 7 and 0 <= j < 9:
        want[0, c, i, j] = True
    if (dy > 0 and pos[0] == 0) or (dy < 0 and pos[0] == 6) or (dx > 0 and pos[1] == 0) or (dx < 0 and pos[1] == 8):
        want[0, c, pos[0], pos[1]] = True
    assert torch.equal(moved, want)


@pytest.mark.parametrize('pos', [(3, 4), (0, 0), (6, 8)])
def test_block_receptive_field_v1(pos):
    """FC1 and FC2 are pointwise and every channel is shifted: one input pixel moves exactly its 4-neighbours'
    outputs, and its own on the border of the map, which keeps its value in the groups shifted away from it."""
    m = visattn.create_attn('s2mlp', 8)
    x = torch.randn(1, 8, 7, 9, dtype=torch.float64)
    m.double()
    x2 = x.clone()
    x2[0, :, pos[0], pos[1]] += 1.0
    moved = ((m(x2) - m(x)).abs() > 1e-12).any(1)[0]
    want = torch.zeros(7, 9, dtype=torch.bool)
    for di, dj in [(1, 0), (-1, 0), (0, 1), (0, -1)]:
        if 0 <= pos[0] + di < 7 and 0 <= pos[1] + dj < 9:
            want[pos[0] + di, pos[1] + dj] = True
    want[pos] = pos[0] in (0, 6) or pos[1] in (0, 8)
    assert torch.equal(moved, want)


def test_parameters():
    C = 64
    v1, v2 = visattn.create_attn('s2mlp', C), visattn.create_attn('s2mlp', C, version=2)
    assert sum(p.numel() for p in v1.parameters()) == 2 * (C * C + C)
    assert sum(p.numel() for p in v2.parameters()) == (3 * C * C + 3 * C) + C * C + 3 * C * C + (C * C + C)
    assert v2.attn_fc1.bias is None and v2.attn_fc2.bias is None
    assert isinstance(v1.act, torch.nn.GELU)


def test_bf16():
    m = visattn.create_attn('s2mlp', 16, version=2)
    x = torch.randn(2, 16, 7, 9)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = m(x)
    torch.testing.assert_close(y.float(), m(x), rtol=0.1, atol=0.1)


@pytest.mark.parametrize('kwargs, arg', [
    (dict(version=3), 'version'),
    (dict(version=0), 'version'),
    (dict(version=2, attn_pool='max'), 'attn_pool'),
])
def test_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        visattn.create_attn('s2mlp', 8, **kwargs)


def test_bad_input():
    with pytest.raises(ValueError, match='SpatialShiftMlp'):
        visattn.create_attn('s2mlp', 8)(torch.randn(1, 4, 3, 3))


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
@pytest.mark.parametrize('version', [1, 2])
def test_scripts(version):
    m = visattn.create_attn('s2mlp', 8, version=version).eval()
    x = torch.randn(2, 8, 5, 7)
    torch.testing.assert_close(torch.jit.script(m)(x), m(x))
