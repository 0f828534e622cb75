"""The fast PyTorch path of ``neighborhood_attention_2d`` (``visattn.ops.neighborhood.torch_blocked``): the same
function as the spec ``neighborhood_attention_2d_naive`` (float64, output and every gradient, ≤ 1e-10), through the
public op, at several tile sizes, chunked (one tile, a few tiles, whole head groups per chunk; its own backward) and
all tiles at once (plain autograd, the form under ``torch.compile``); low-precision inputs; a map exactly one window
wide against dense attention; gradcheck."""

import pytest
import torch

from visattn.ops.neighborhood import (
    neighborhood_attention_2d,
    neighborhood_attention_2d_blocked,
    neighborhood_attention_2d_naive,
)

D64 = torch.float64

# (Hs, Ws, kernel_size, dilation): odd maps, every dilation that leaves k positions in each residue class
CASES = [(hs, ws, ks, d) for hs, ws in ((7, 9), (11, 13)) for ks in (3, 5, 7) for d in (1, 2, 3)
         if hs // d >= ks and ws // d >= ks]


def _inputs(hs, ws, ks, with_rpb, dtype=D64, b=2, h=2, dk=5, dv=4):
    torch.manual_seed(42)
    q, k = torch.randn(2, b, h, hs, ws, dk, dtype=dtype).unbind(0)
    v = torch.randn(b, h, hs, ws, dv, dtype=dtype)
    rpb = torch.randn(h, 2 * ks - 1, 2 * ks - 1, dtype=dtype) if with_rpb else None
    return q, k, v, rpb


def _out_and_grads(fn, q, k, v, rpb, grad_out=None):
    """``fn(q, k, v, rpb)`` and the gradients of ``(out * grad_out).sum()`` w.r.t. q, k, v (and rpb)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    bias = None if rpb is None else rpb.detach().clone().requires_grad_()
    out = fn(*leaves, bias)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves + ([bias] if bias is not None else []), grad_out)
    return out, grads, grad_out


def _assert_same(fn, ref, q, k, v, rpb, atol=1e-10):
    out, grads, g = _out_and_grads(fn, q, k, v, rpb)
    want, want_grads, _ = _out_and_grads(ref, q, k, v, rpb, g)
    assert out.dtype == want.dtype
    torch.testing.assert_close(out, want, atol=atol, rtol=0)
    names = ['q', 'k', 'v', 'rpb']
    for name, got, exp in zip(names, grads, want_grads):
        torch.testing.assert_close(got, exp, atol=atol, rtol=0, msg=lambda m, name=name: f'gradient of {name}: {m}')


@pytest.mark.parametrize('with_rpb', [False, True])
@pytest.mark.parametrize('hs,ws,ks,d', CASES)
def test_op_torch_path_is_the_spec(hs, ws, ks, d, with_rpb):
    q, k, v, rpb = _inputs(hs, ws, ks, with_rpb)
    scale = 0.37  # not the default 1/sqrt(5)

    def op(q, k, v, rpb):
        return neighborhood_attention_2d(q, k, v, kernel_size=ks, dilation=d, rpb=rpb, scale=scale, backend='torch')

    def spec(q, k, v, rpb):
        return neighborhood_attention_2d_naive(q, k, v, ks, d, rpb, scale)

    _assert_same(op, spec, q, k, v, rpb)


@pytest.mark.parametrize('tile', [1, 2, 3, 5, 16])
@pytest.mark.parametrize('hs,ws,ks,d', [(11, 13, 3, 2), (13, 11, 5, 1), (11, 13, 3, 3)])
def test_every_tile_size_gives_the_spec(hs, ws, ks, d, tile):
    # tiles that run past their residue class, classes of unequal lengths, bands clamped at both borders
    q, k, v, rpb = _inputs(hs, ws, ks, True)
    _assert_same(lambda *a: neighborhood_attention_2d_blocked(*a[:3], ks, d, a[3], tile=tile),
                 lambda *a: neighborhood_attention_2d_naive(*a[:3], ks, d, a[3]), q, k, v, rpb)


@pytest.mark.parametrize('chunk', [0, 1, 40, 700, 1 << 20])
@pytest.mark.parametrize('hs,ws,ks,d,tile', [(11, 13, 3, 2, 2), (13, 11, 5, 1, 4), (9, 10, 3, 1, 3), (14, 14, 7, 1, 4)])
def test_every_chunk_size_gives_the_spec(hs, ws, ks, d, tile, chunk):
    # chunk 0: every tile at once; 1 and 40: one or a few tiles per chunk (fewer than a head's); 700 and 2^20:
    # whole heads, grouped; tiles that repeat a query (11, 13 at tile 2 and 4) and tiles that divide the map (14)
    q, k, v, rpb = _inputs(hs, ws, ks, True, h=3)
    _assert_same(lambda *a: neighborhood_attention_2d_blocked(*a[:3], ks, d, a[3], 0.6, tile=tile, chunk=chunk),
                 lambda *a: neighborhood_attention_2d_naive(*a[:3], ks, d, a[3], 0.6), q, k, v, rpb)


def test_chunked_path_without_bias_and_with_unequal_head_widths():
    q, k, v, _ = _inputs(9, 11, 3, False, dk=6, dv=3)
    _assert_same(lambda *a: neighborhood_attention_2d_blocked(*a[:3], 3, 2, None, chunk=50),
                 lambda *a: neighborhood_attention_2d_naive(*a[:3], 3, 2, None), q, k, v, None)


def test_chunked_path_takes_strided_inputs_and_the_layers_layout():
    # q, k, v as the layer passes them: views of one [B, Hs, Ws, 3, H, D] projection
    torch.manual_seed(0)
    qkv = torch.randn(2, 9, 10, 3, 2, 4, dtype=D64)
    q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)
    rpb = torch.randn(2, 5, 5, dtype=D64)
    _assert_same(lambda *a: neighborhood_attention_2d_blocked(*a[:3], 3, 1, a[3], chunk=30),
                 lambda *a: neighborhood_attention_2d_naive(*a[:3], 3, 1, a[3]), q, k, v, rpb)


def test_chunked_path_on_an_empty_batch():
    q, k, v, rpb = _inputs(7, 9, 3, True, b=0)
    assert neighborhood_attention_2d_blocked(q, k, v, 3, 1, rpb).shape == (0, 2, 7, 9, 4)


@pytest.mark.parametrize('ks,d', [(5, 1), (3, 2)])
def test_map_one_window_wide_is_dense_attention_on_each_class(ks, d):
    # Hs = Ws = k·d: every query sees every key of its residue class; the reference is a dense softmax per class
    # pair with NAT's bias at the class offsets
    size = ks * d
    q, k, v, rpb = _inputs(size, size, ks, True)
    out = neighborhood_attention_2d(q, k, v, kernel_size=ks, dilation=d, rpb=rpb, backend='torch')
    pos = torch.arange(ks)
    rel = pos[None, :] - pos[:, None] + ks - 1  # [query, key] row of the table
    bias = rpb[:, rel[:, None, :, None], rel[None, :, None, :]].reshape(rpb.shape[0], ks * ks, ks * ks)
    for r in range(d):
        for c in range(d):
            qs, kk, vs = (t[:, :, r::d, c::d].reshape(t.shape[0], t.shape[1], ks * ks, t.shape[-1]) for t in (q, k, v))
            p = torch.softmax(qs @ kk.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias, dim=-1)
            want = (p @ vs).reshape(q.shape[0], q.shape[1], ks, ks, v.shape[-1])
            torch.testing.assert_close(out[:, :, r::d, c::d], want, atol=1e-10, rtol=0)


@pytest.mark.parametrize('chunk', [None, 0])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_low_precision_returns_its_dtype_and_matches_float32(dtype, chunk):
    q, k, v, rpb = _inputs(11, 13, 5, True, dtype=torch.float32)
    q16, k16, v16, rpb16 = (t.to(dtype) for t in (q, k, v, rpb))
    out, grads, g = _out_and_grads(
        lambda *a: neighborhood_attention_2d_blocked(*a[:3], 5, 2, a[3], chunk=chunk), q16, k16, v16, rpb16)
    assert out.dtype == dtype and all(t.dtype == dtype for t in grads)
    # the float32 reference on the rounded inputs: the path computes in float32 and rounds once at the end
    want, want_grads, _ = _out_and_grads(
        lambda *a: neighborhood_attention_2d_naive(*a[:3], 5, 2, a[3]),
        *(t.float() for t in (q16, k16, v16, rpb16)), g.float())
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out.float(), want, **tol)
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got.float(), exp, atol=tol['atol'] * 4, rtol=tol['rtol'] * 4)


@pytest.mark.parametrize('chunk', [0, 5])
@pytest.mark.parametrize('ks,d', [(3, 1), (3, 2)])
def test_gradcheck(ks, d, chunk):
    # fast mode: the Jacobian checked along random directions (the full one takes seconds per case)
    q, k, v, rpb = _inputs(6, 7, ks, True, b=1, dk=3, dv=2)
    inputs = tuple(t.requires_grad_() for t in (q, k, v, rpb))
    assert torch.autograd.gradcheck(
        lambda q, k, v, rpb: neighborhood_attention_2d_blocked(q, k, v, ks, d, rpb, 0.8, tile=2, chunk=chunk), inputs,
        fast_mode=True)


@pytest.mark.parametrize('tile', [0, 2.0])
def test_bad_tile_is_refused(tile):
    q, k, v, _ = _inputs(7, 9, 3, False)
    with pytest.raises(ValueError, match='tile must be a positive int'):
        neighborhood_attention_2d_blocked(q, k, v, 3, tile=tile)


@pytest.mark.parametrize('chunk', [-1, 2.0])
def test_bad_chunk_is_refused(chunk):
    q, k, v, _ = _inputs(7, 9, 3, False)
    with pytest.raises(ValueError, match='chunk must be a non-negative int'):
        neighborhood_attention_2d_blocked(q, k, v, 3, chunk=chunk)


def test_meta_tensors_take_the_all_tiles_form():
    # the chunked form's bookkeeping reads index values, which meta tensors do not have
    q = torch.empty(2, 3, 9, 10, 4, device='meta')
    out = neighborhood_attention_2d_blocked(q, q, q, 3, 1, torch.empty(3, 5, 5, device='meta'))
    assert out.device.type == 'meta' and out.shape == (2, 3, 9, 10, 4)
