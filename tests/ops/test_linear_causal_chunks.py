"""The chunk-parallel causal path of ``linear_attention``'s Triton kernels, in the interpreter: 16-row tiles and
chunks of one or two tiles, so that the prefix states (forward, dq) and suffix states (dk, dv) between chunks and
the running state between the tiles of a chunk all count; N not a multiple of the chunk, Dk ≠ Dv."""

import pytest
import torch

import visattn.ops as ops

triton = pytest.importorskip('triton')

from _compare import check_against_torch  # noqa: E402


@pytest.fixture
def small_chunks(monkeypatch):
    """``small_chunks(tiles, state_rows=16, state_slice=None)``: chunks of ``tiles`` tiles of ``state_rows`` rows (the
    last chunk shorter where N ends first); the state kernel's tiles have ``state_rows`` rows, the chunk kernels' 16
    (as on a GPU, where they walk a chunk in smaller tiles than the state kernel); ``state_slice``: the width of the
    parts the backward cuts the state into (as on a GPU for heads over 64)."""
    from visattn.ops.linear import triton as lin

    cfg = lin._cfg

    def set_tiles(tiles, state_rows=16, state_slice=None):
        def small(n, dk, dv):
            out = cfg(n, dk, dv)
            for key in ('state', 'apply_fwd', 'apply_bwd', 'chunk'):
                out[key] = dict(out[key], BLOCK_N=state_rows if key == 'state' else 16)
            if state_slice:
                out['slice'] = state_slice
            return out

        monkeypatch.setattr(lin, '_cfg', small)
        monkeypatch.setattr(lin, '_num_splits', lambda n, bh, block_n: triton.cdiv(n, tiles * block_n))
        chunk = state_rows * tiles
        assert lin._chunk_rows(50, 6, small(50, 4, 4)) == lin._chunk_rows(64, 6, small(64, 4, 4)) == chunk

    return set_tiles


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
@pytest.mark.parametrize('tiles,state_rows', [(1, 16), (2, 16), (1, 32)])
@pytest.mark.parametrize('n', [50, 64])
def test_causal_chunks_match_torch(n, tiles, state_rows, dtype, small_chunks, poison_empty, grads_of):
    small_chunks(tiles, state_rows)
    torch.manual_seed(42)
    q, k = torch.rand(2, 2, 3, n, 12).unbind(0)  # non-negative features, as after φ
    v = torch.randn(2, 3, n, 20)
    check_against_torch(lambda *a, backend: ops.linear_attention(*a, causal=True, backend=backend), [q, k, v],
                        dtype, grads_of, grad_scale=4)


def test_causal_chunks_with_feature_map_and_eps(small_chunks, poison_empty, grads_of):
    small_chunks(1)
    torch.manual_seed(42)
    q, k = torch.randn(2, 1, 2, 50, 24).unbind(0)
    v = torch.randn(1, 2, 50, 9)
    check_against_torch(lambda *a, backend: ops.linear_attention(*a, causal=True, feature_map='elu+1', eps=1e-2,
                                                                 backend=backend),
                        [q, k, v], torch.float32, grads_of)


@pytest.mark.parametrize('causal', [False, True])
def test_empty_sequence(causal, poison_empty, grads_of):
    q, k, v = torch.rand(3, 1, 2, 0, 4).unbind(0)
    check_against_torch(lambda *a, backend: ops.linear_attention(*a, causal=causal, backend=backend), [q, k, v],
                        torch.float32, grads_of)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
@pytest.mark.parametrize('dk,dv', [(24, 20), (40, 12)])
def test_causal_backward_on_slices_of_the_state(dk, dv, dtype, small_chunks, poison_empty, grads_of):
    # 16-wide parts of a 32- or 64-wide state: dq and dk over Dk slices, dv over Dv slices (one where Dv fits)
    small_chunks(2, state_slice=16)
    torch.manual_seed(42)
    q, k = torch.rand(2, 1, 2, 50, dk).unbind(0)
    v = torch.randn(1, 2, 50, dv)
    check_against_torch(lambda *a, backend: ops.linear_attention(*a, causal=True, backend=backend), [q, k, v],
                        dtype, grads_of, grad_scale=4)
