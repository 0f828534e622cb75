"""``halo_attention_2d``: the PyTorch path against a dense float64 reference written from the definition (the full
HW×HW masked logits), the Triton kernels (CPU interpreter) against the PyTorch path, and argument errors."""

import pytest
import torch
from _compare import TOL, check_against_torch  # noqa: E402

import visattn.ops as ops
from visattn.layers import HaloAttn
from visattn.ops._dispatch import triton_available

D64 = torch.float64
needs_triton = pytest.mark.skipif(not triton_available(), reason='triton is not installed')


def dense_halo(q, k, v, block_size, halo_size, stride=1, rel_h=None, rel_w=None, scale=None, pad_mode='zeros',
               rel_stride=None):
    """Query (i, j) at pixel (s·i, s·j), in block row/column (y, x) of the block with corner (r0, c0), attends to the
    keys (a, c) with r0 - h <= a < r0 + b + h and c0 - h <= c < c0 + b + h, taken from the map zero-padded on every
    side (pad_mode='zeros') or only those inside the map (pad_mode='mask'); logit scale·(q·k + q·rel_h[a - r0 - r·y
    + win - 1] + q·rel_w[c - c0 - r·x + win - 1]), r = rel_stride (default s)."""
    B, N, H, W, dk = k.shape
    hq, wq = q.shape[2], q.shape[3]
    b, h, win = block_size, halo_size, block_size + 2 * halo_size
    bq, r = b // stride, stride if rel_stride is None else rel_stride
    scale = dk ** -0.5 if scale is None else scale
    Hp, Wp = -(-H // b) * b, -(-W // b) * b
    # keys of the zero-padded map [-h, Hp + h) × [-h, Wp + h), flattened
    k, v = (torch.nn.functional.pad(t, (0, 0, h, h + Wp - W, h, h + Hp - H)).flatten(2, 3) for t in (k, v))
    ky = torch.arange(-h, Hp + h).repeat_interleave(Wp + 2 * h)
    kx = torch.arange(-h, Wp + h).repeat(Hp + 2 * h)
    qi, qj = torch.arange(hq).repeat_interleave(wq), torch.arange(wq).repeat(hq)  # query grid positions
    r0, c0 = (qi // bq * b)[:, None], (qj // bq * b)[:, None]
    allowed = (ky >= r0 - h) & (ky < r0 + b + h) & (kx >= c0 - h) & (kx < c0 + b + h)  # [Hq·Wq, keys]
    if pad_mode == 'mask':
        allowed &= (ky >= 0) & (ky < H) & (kx >= 0) & (kx < W)
    qf = q.flatten(2, 3)
    logits = qf @ k.transpose(-1, -2)
    if rel_h is not None:
        dy = ky[None] - r0 - r * (qi % bq)[:, None] + win - 1
        dx = kx[None] - c0 - r * (qj % bq)[:, None] + win - 1
        dy, dx = (t.clamp(0, 2 * win - 2).expand(B, N, -1, -1) for t in (dy, dx))  # clamped where not allowed
        logits = logits + (qf @ rel_h.T).gather(-1, dy) + (qf @ rel_w.T).gather(-1, dx)
    attn = torch.softmax((logits * scale).masked_fill(~allowed, float('-inf')), -1)
    return (attn @ v).unflatten(2, (hq, wq))


def make_inputs(batch, heads, hw, block_size, halo_size, stride, dk, dv, with_rel, dtype=D64):
    H, W = hw
    win = block_size + 2 * halo_size
    q = torch.randn(batch, heads, -(-H // stride), -(-W // stride), dk, dtype=dtype)
    k = torch.randn(batch, heads, H, W, dk, dtype=dtype)
    v = torch.randn(batch, heads, H, W, dv, dtype=dtype)
    rel = list(torch.randn(2, 2 * win - 1, dk, dtype=dtype)) if with_rel else []
    return [q, k, v, *rel]


def halo_fn(block_size, halo_size, stride, scale=None, pad_mode='zeros', rel_stride=None):
    def fn(q, k, v, rel_h=None, rel_w=None, *, backend):
        return ops.halo_attention_2d(q, k, v, block_size=block_size, halo_size=halo_size, stride=stride,
                                     rel_h=rel_h, rel_w=rel_w, scale=scale, pad_mode=pad_mode, rel_stride=rel_stride,
                                     backend=backend)

    return fn


# (H, W), b, h, s, rel, rel_stride: odd maps, blocks cut by the border, halo wider than the block, h = 0, no
# embeddings, offsets in query-grid steps (timm's strided layout)
CASES = [((7, 9), 4, 1, 1, True, None), ((7, 9), 4, 2, 2, True, None), ((5, 6), 2, 3, 2, True, None),
         ((7, 9), 4, 0, 1, True, None), ((9, 5), 3, 1, 1, False, None), ((6, 7), 4, 1, 4, True, None),
         ((7, 9), 4, 2, 2, True, 1), ((6, 7), 4, 1, 4, True, 2)]


@pytest.mark.parametrize('pad_mode', ['zeros', 'mask'])
@pytest.mark.parametrize('hw,block_size,halo_size,stride,with_rel,rel_stride', CASES)
def test_naive_matches_dense_definition(hw, block_size, halo_size, stride, with_rel, rel_stride, pad_mode):
    inputs = make_inputs(2, 2, hw, block_size, halo_size, stride, 5, 3, with_rel)
    fn = halo_fn(block_size, halo_size, stride, scale=0.7, pad_mode=pad_mode, rel_stride=rel_stride)
    a = [t.clone().requires_grad_() for t in inputs]
    b = [t.clone().requires_grad_() for t in inputs]
    out = fn(*a, backend='torch')
    ref = dense_halo(*b[:3], block_size, halo_size, stride, *b[3:], scale=0.7, pad_mode=pad_mode, rel_stride=rel_stride)
    assert out.shape == ref.shape == (2, 2, -(-hw[0] // stride), -(-hw[1] // stride), 3)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-8)
    g = torch.randn_like(out)
    for name, x, y in zip('q k v rel_h rel_w'.split(), torch.autograd.grad(out, a, g), torch.autograd.grad(ref, b, g)):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-8, msg=lambda m, n=name: f'd{n}: {m}')


def test_naive_keeps_half_dtypes_and_default_scale():
    inputs = make_inputs(1, 2, (7, 9), 4, 1, 1, 8, 4, True, dtype=torch.float32)
    ref = dense_halo(*(t.double() for t in inputs[:3]), 4, 1, 1, *(t.double() for t in inputs[3:]))
    for dtype in (torch.float16, torch.bfloat16):
        out = halo_fn(4, 1, 1)(*(t.to(dtype) for t in inputs), backend='torch')
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=3e-2)


def test_block_and_op_agree():
    """HaloAttn's output is the op's on the block's projections (its parameters and state dict unchanged)."""
    m = HaloAttn(8, 8, num_heads=2, block_size=4, halo_size=1, stride=2, dtype=D64)
    assert set(m.state_dict()) == {'q.weight', 'kv.weight', 'rel_height', 'rel_width'}
    x = torch.randn(1, 8, 7, 9, dtype=D64)
    q = m.q(x).unflatten(1, (2, 4)).permute(0, 1, 3, 4, 2)
    k, v = m.kv(x).unflatten(1, (2, 8)).permute(0, 1, 3, 4, 2).split([4, 4], -1)
    ref = dense_halo(q, k, v, 4, 1, 2, m.rel_height, m.rel_width)
    torch.testing.assert_close(m(x), ref.permute(0, 1, 4, 2, 3).flatten(1, 2))


@needs_triton
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
def test_triton_matches_naive(dtype, poison_empty, grads_of):
    inputs = make_inputs(1, 2, (7, 9), 4, 1, 1, 12, 6, True, dtype=torch.float32)
    check_against_torch(halo_fn(4, 1, 1), inputs, dtype, grads_of)


@needs_triton
@pytest.mark.parametrize('hw,block_size,halo_size,stride,with_rel,pad_mode,rel_stride', [
    ((7, 9), 4, 2, 2, True, 'zeros', None), ((5, 4), 2, 3, 1, True, 'zeros', None),
    ((9, 5), 3, 1, 1, False, 'zeros', None),
    ((7, 9), 4, 2, 2, True, 'mask', None), ((5, 4), 2, 3, 1, True, 'mask', None), ((7, 9), 4, 1, 2, True, 'zeros', 1),
])
def test_triton_strides_and_halos(hw, block_size, halo_size, stride, with_rel, pad_mode, rel_stride, poison_empty,
                                  grads_of):
    inputs = make_inputs(2, 1, hw, block_size, halo_size, stride, 12, 6, with_rel, dtype=torch.float32)
    fn = halo_fn(block_size, halo_size, stride, pad_mode=pad_mode, rel_stride=rel_stride)
    check_against_torch(fn, inputs, torch.float32, grads_of)


@needs_triton
def test_triton_over_many_tiles(monkeypatch, poison_empty, grads_of):
    from visattn.ops.halo import triton as halo_triton

    monkeypatch.setattr(halo_triton, 'BLOCK', 16)  # 3 query tiles a block, 4 key tiles a window, 3 a key block
    inputs = make_inputs(1, 1, (7, 8), 6, 1, 1, 20, 6, True, dtype=torch.float32)
    check_against_torch(halo_fn(6, 1, 1, scale=0.3), inputs, torch.float32, grads_of)


@needs_triton
def test_block_runs_the_kernels(monkeypatch):
    """HaloAttn on the Triton path (non-contiguous q, k, v views, expanded output gradient) equals its PyTorch path."""
    m = HaloAttn(8, 8, num_heads=2, block_size=4, halo_size=1)
    x = torch.randn(1, 8, 5, 6)
    want = m(x)
    monkeypatch.setenv('VISATTN_BACKEND', 'triton')
    xg = x.clone().requires_grad_()
    got = m(xg)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    got.sum().backward()
    ref = x.clone().requires_grad_()
    monkeypatch.setenv('VISATTN_BACKEND', 'torch')
    m(ref).sum().backward()
    torch.testing.assert_close(xg.grad, ref.grad, **TOL[torch.float32])


q5, k5, v5 = torch.randn(1, 2, 4, 5, 4), torch.randn(1, 2, 7, 9, 4), torch.randn(1, 2, 7, 9, 3)
r5 = torch.randn(11, 4)  # 2·(4 + 2·1) - 1 rows


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(q=q5[0]), ValueError, r'q must be \[B, N, H, W, D\]'),
    (dict(q=torch.randn(1, 2, 7, 9, 4)), ValueError, r'q must be \[B, N, ceil\(H / stride\)'),
    (dict(v=v5[:, :, :6]), ValueError, 'v must be'),
    (dict(k=k5.half()), TypeError, 'k has dtype'),
    (dict(block_size=0), ValueError, 'block_size must be >= 1'),
    (dict(halo_size=-1), ValueError, 'halo_size must be >= 0'),
    (dict(stride=3), ValueError, 'stride=3 must divide block_size=4'),
    (dict(stride=2.0), TypeError, 'stride must be an int'),
    (dict(rel_w=None), ValueError, 'rel_h and rel_w'),
    (dict(rel_h=torch.randn(9, 4)), ValueError, r'rel_h must be \[2·\(block_size'),
    (dict(rel_w=r5.double()), TypeError, 'rel_w has dtype'),
    (dict(scale=0.0), ValueError, 'scale'),
    (dict(pad_mode='same'), ValueError, 'pad_mode must be one of'),
    (dict(rel_stride=3), ValueError, r'rel_stride must be in \[1, stride=2\], got 3'),
    (dict(rel_stride=0), ValueError, 'rel_stride must be >= 1'),
    (dict(backend='cuda'), ValueError, 'backend must be one of'),
])
def test_bad_input_is_named(kwargs, error, match):
    args = dict(q=q5, k=k5, v=v5, block_size=4, halo_size=1, stride=2, rel_h=r5, rel_w=r5) | kwargs
    with pytest.raises(error, match=match):
        ops.halo_attention_2d(args.pop('q'), args.pop('k'), args.pop('v'), **args)
