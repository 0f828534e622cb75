"""The tensor-core criss-cross kernels (``visattn.ops.criss_cross.triton``) with tiles of 4 to 8 positions (the
interpreter takes any tile size), so that every row and column spans several q/k tiles and the values several
``BLOCK_DV`` slices: output and every gradient against the PyTorch path, in Triton's CPU interpreter, outputs
allocated NaN-poisoned. The interpreter pays ~ms per loop step, hence the small maps."""

import pytest
import torch

import visattn.ops as ops

pytest.importorskip('triton')

from _compare import check_against_torch  # noqa: E402


def check_tiles(monkeypatch, grads_of, shape, dv, dtype, block_m=4, block_n=4, scale=None):
    """Triton (tiles of ``block_m`` queries, ``block_n`` keys, 4 values) against torch on q, k of ``shape``."""
    from visattn.ops.criss_cross import triton as cc

    monkeypatch.setattr(cc, 'blocks', lambda length, dk, dv, size: dict(BLOCK_M=block_m, BLOCK_N=block_n,
                                                                         BLOCK_DK=4, BLOCK_DV=4))
    torch.manual_seed(42)
    q, k = torch.randn(2, *shape).to(dtype).unbind(0)
    v = torch.randn(*shape[:-1], dv).to(dtype)

    def fn(*a, backend):
        return ops.criss_cross_attention(*a, scale=scale, backend=backend)

    check_against_torch(fn, [q, k, v], dtype, grads_of)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_several_tiles_per_row_and_column(dtype, monkeypatch, poison_empty, grads_of):
    # rows of 5 and columns of 7 (2 tiles each), Dk = 3 in a 4-wide tile, Dv = 6 in 2 slices
    check_tiles(monkeypatch, grads_of, (1, 1, 7, 5, 3), 6, dtype, scale=1.0)


@pytest.mark.parametrize('block_m,block_n', [(4, 8), (8, 4)])
def test_query_and_key_tiles_of_different_sizes(block_m, block_n, monkeypatch, poison_empty, grads_of):
    # the diagonal that the column pass leaves out crosses tiles of queries and keys at different offsets
    check_tiles(monkeypatch, grads_of, (1, 1, 9, 6, 3), 6, torch.float32, block_m=block_m, block_n=block_n)


@pytest.mark.parametrize('hs,ws', [(1, 9), (9, 1)])
def test_a_single_row_or_column_over_several_tiles(hs, ws, monkeypatch, poison_empty, grads_of):
    # Hs = 1: every column pass is empty (only the diagonal); Ws = 1: every row pass holds only the query itself
    check_tiles(monkeypatch, grads_of, (1, 1, hs, ws, 4), 6, torch.float32)


def test_backward_value_slices_narrower_than_the_forward(monkeypatch, poison_empty, grads_of):
    # as on a GPU, dq and dk sum dP = dO·Vᵀ over narrower value slices (2) than the forward and dv kernels use (4)
    from visattn.ops.criss_cross import triton as cc

    cfgs = cc._kernel_cfgs

    def narrow(tiles, element_size):
        out = cfgs(tiles, element_size)
        return dict(out, dqdk=dict(out['dqdk'], BLOCK_DV=2))

    monkeypatch.setattr(cc, '_kernel_cfgs', narrow)
    check_tiles(monkeypatch, grads_of, (1, 1, 7, 5, 3), 7, torch.float32)
