"""The tiled tensor-core neighbourhood kernels (``visattn.ops.neighborhood.triton``) with small tiles, so that a map
holds several query tiles along both axes, the unions of windows are clipped at every border and the query
regions of the dk/dv pass widen there: output and every gradient against the PyTorch path."""

import pytest
import torch

import visattn.ops as ops

pytest.importorskip('triton')

from _compare import TOL, check_against_torch  # noqa: E402


@pytest.fixture
def small_tiles(monkeypatch):
    """``small_tiles((TILE_H, TILE_W, BLOCK_N))`` sets the tile sizes of the neighbourhood kernels."""
    from visattn.ops.neighborhood import triton as na_triton

    return lambda tile: monkeypatch.setattr(na_triton, 'TILE', tile)


def _neighborhood(kernel_size, dilation):
    def fn(q, k, v, rpb=None, *, backend):
        return ops.neighborhood_attention_2d(q, k, v, kernel_size=kernel_size, dilation=dilation, rpb=rpb,
                                             backend=backend)

    return fn


@pytest.mark.parametrize('hs,ws,kernel_size,dilation,tile,with_rpb,dtype', [
    (11, 13, 3, 1, (4, 4, 16), True, torch.float32),
    (11, 13, 5, 1, (4, 8, 32), False, torch.float16),
    (11, 13, 7, 1, (4, 4, 32), True, torch.float16),
    (13, 11, 7, 1, (8, 4, 64), False, torch.float32),
    (11, 13, 5, 2, (4, 4, 16), True, torch.float32),
    (13, 11, 3, 3, (4, 4, 16), True, torch.float16),  # classes of 5, 4, 4 rows: the last row of tiles is empty
])
def test_neighborhood_tiles_against_torch(hs, ws, kernel_size, dilation, tile, with_rpb, dtype, small_tiles,
                                          poison_empty, grads_of):
    small_tiles(tile)
    torch.manual_seed(42)
    q, k = torch.randn(2, 1, 2, hs, ws, 12).unbind(0)
    v = torch.randn(1, 2, hs, ws, 10)
    rpb = [torch.randn(2, 2 * kernel_size - 1, 2 * kernel_size - 1)] if with_rpb else []
    check_against_torch(_neighborhood(kernel_size, dilation), [q, k, v, *rpb], dtype, grads_of)


@pytest.mark.parametrize('kernel_size', [1, 5])
def test_neighborhood_tiles_at_the_extreme_kernel_sizes(kernel_size, small_tiles, poison_empty, grads_of):
    # 1: each query attends itself; 5 = the map's height: every query sees all rows. Batch and heads > 1: the bias
    # and its gradient are per head
    small_tiles((4, 4, 16))
    torch.manual_seed(42)
    q, k, v = torch.randn(3, 2, 3, 5, 7, 8).unbind(0)
    rpb = torch.randn(3, 2 * kernel_size - 1, 2 * kernel_size - 1)
    check_against_torch(_neighborhood(kernel_size, 1), [q, k, v, rpb], torch.float32, grads_of)


def test_neighborhood_kernels_take_strided_inputs_and_expanded_gradients(small_tiles, poison_empty):
    small_tiles((4, 8, 32))
    torch.manual_seed(42)
    qkv = torch.randn(1, 9, 10, 3, 2, 16).permute(3, 0, 4, 1, 2, 5)  # [3, B, H, Hs, Ws, D], not contiguous
    q, k, v = (t.requires_grad_() for t in qkv.detach().clone().unbind(0))
    rpb = torch.randn(2, 5, 5, requires_grad=True)
    fn = _neighborhood(3, 1)
    out = fn(q, k, v, rpb, backend='triton')
    ref = fn(q, k, v, rpb, backend='torch')
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    # out.sum() sends a stride-0 gradient
    inputs = (q, k, v, rpb)
    for got, want in zip(torch.autograd.grad(out.sum(), inputs), torch.autograd.grad(ref.sum(), inputs)):
        torch.testing.assert_close(got, want, **TOL[torch.float32])
