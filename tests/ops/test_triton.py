"""Every Triton kernel, run in Triton's CPU interpreter, against the PyTorch path: output and every gradient,
odd sizes, float32 / float16 / bfloat16 (bfloat16 runs through float32 in the interpreter), and outputs
allocated NaN-poisoned so that an unwritten element fails."""

import pytest
import torch

import visattn.ops as ops

pytest.importorskip('triton')

from _compare import TOL, check_against_torch  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('causal', [False, True])
def test_linear_attention_kernels(causal, dtype, poison_empty, grads_of):
    q, k = torch.rand(2, 2, 3, 63, 60).unbind(0)  # non-negative features, as after φ
    v = torch.randn(2, 3, 63, 20)
    check_against_torch(lambda *a, backend: ops.linear_attention(*a, causal=causal, backend=backend), [q, k, v],
                        dtype, grads_of, grad_scale=4)


@pytest.mark.parametrize('causal', [False, True])
def test_linear_attention_kernels_over_many_chunks_and_split_state(causal, monkeypatch, poison_empty, grads_of):
    from visattn.ops.linear import triton as lin

    monkeypatch.setattr(lin, '_num_splits', lambda n, bh, block_n: 3)  # the GPU's split sum over N
    q, k, v = torch.randn(3, 2, 1, 150, 12).unbind(0)
    check_against_torch(lambda *a, backend: ops.linear_attention(*a, causal=causal, feature_map='elu+1',
                                                                 backend=backend),
                        [q, k, v], torch.float32, grads_of)


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('window,dilation,causal', [(7, 1, False), (9, 1, True), (5, 3, True), (7, 2, False),
                                                    (3, 5, False)])
def test_local_attention_1d_kernels(window, dilation, causal, dtype, poison_empty, grads_of):
    q, k = torch.randn(2, 2, 2, 63, 60).unbind(0)
    v = torch.randn(2, 2, 63, 20)
    check_against_torch(lambda *a, backend: ops.local_attention_1d(*a, window=window, dilation=dilation,
                                                                   causal=causal, backend=backend),
                        [q, k, v], dtype, grads_of)


@pytest.mark.parametrize('window,causal,dtype,rows', [(33, False, torch.float32, (16, 16)),
                                                     (33, True, torch.float16, (16, 16)),
                                                     (201, False, torch.float32, (16, 16)),
                                                     (33, True, torch.float32, (32, 16))])
def test_local_attention_1d_banded_kernels_over_many_tiles(window, causal, dtype, rows, monkeypatch, poison_empty,
                                                           grads_of):
    from visattn.ops.local1d import triton as local_triton

    configs = local_triton._configs

    def small(dk, dv, size):  # several query and key tiles per band; forward and backward tiles of ``rows``
        return tuple(dict(cfg, BLOCK_M=r, BLOCK_N=r) for cfg, r in zip(configs(dk, dv, size), rows))

    monkeypatch.setattr(local_triton, '_configs', small)
    q, k = torch.randn(2, 1, 2, 100, 24).unbind(0)
    v = torch.randn(1, 2, 100, 20)
    check_against_torch(lambda *a, backend: ops.local_attention_1d(*a, window=window, causal=causal,
                                                                   backend=backend),
                        [q, k, v], dtype, grads_of)


@pytest.mark.parametrize('kernel_size,dilation,with_rpb,dtype', [
    (3, 1, True, torch.float32), (3, 1, True, torch.float16), (3, 1, True, torch.bfloat16),
    (3, 2, True, torch.float32), (3, 2, False, torch.float16), (7, 1, False, torch.float32),
])
def test_neighborhood_attention_kernels(kernel_size, dilation, with_rpb, dtype, poison_empty, grads_of):
    q, k = torch.randn(2, 1, 2, 7, 9, 12).unbind(0)
    v = torch.randn(1, 2, 7, 9, 6)
    rpb = torch.randn(2, 2 * kernel_size - 1, 2 * kernel_size - 1) if with_rpb else None

    def fn(q, k, v, rpb=None, *, backend):
        return ops.neighborhood_attention_2d(q, k, v, kernel_size=kernel_size, dilation=dilation, rpb=rpb,
                                             backend=backend)

    check_against_torch(fn, [q, k, v] + ([rpb] if with_rpb else []), dtype, grads_of)


@pytest.mark.parametrize('dtype', DTYPES)
def test_criss_cross_attention_kernels(dtype, poison_empty, grads_of):
    q, k = torch.randn(2, 2, 2, 7, 9, 12).unbind(0)
    v = torch.randn(2, 2, 7, 9, 5)
    check_against_torch(lambda *a, backend: ops.criss_cross_attention(*a, scale=1.0, backend=backend), [q, k, v],
                        dtype, grads_of)


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('pool', ['avg', 'max', 'avgmax'])
def test_channel_gate_kernels(pool, dtype, poison_empty, grads_of):
    x = torch.randn(2, 12, 7, 9)
    params = [torch.randn(3, 12, 1, 1), torch.randn(3), torch.randn(12, 3, 1, 1), torch.randn(12)]
    # weights stay float32 (as under autocast); x takes the dtype
    inputs = [x.to(dtype), *params]
    out, grads, g = grads_of(lambda *a: ops.channel_gate(*a, pool=pool, backend='triton'), inputs)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref, ref_grads, _ = grads_of(lambda *a: ops.channel_gate(*a, pool=pool, backend='torch'), inputs, g)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize('dtype', DTYPES)
def test_eca_gate_kernels(dtype, poison_empty, grads_of):
    x = torch.randn(2, 13, 7, 9)
    check_against_torch(lambda x, w, backend: ops.eca_gate(x, w, backend=backend), [x, torch.randn(1, 1, 5)], dtype,
                        grads_of)


def test_channel_gate_kernels_without_biases(poison_empty, grads_of):
    x = torch.randn(3, 8, 5, 3)
    check_against_torch(lambda x, w1, w2, backend: ops.channel_gate(x, w1, None, w2, None, pool='avgmax',
                                                                     act='silu', backend=backend),
                        [x, torch.randn(4, 8), torch.randn(8, 4)], torch.float32, grads_of)


@pytest.mark.parametrize('act', ['gelu', 'relu'])
def test_channel_gate_kernels_wide(act, poison_empty, grads_of):
    # C = 80: several channel blocks and several chunks of the in-kernel fc1; Cr = 5 (not a power of two)
    x = torch.randn(3, 80, 5, 3)
    check_against_torch(lambda *a, backend: ops.channel_gate(*a, pool='avgmax', act=act, backend=backend),
                        [x, torch.randn(5, 80), torch.randn(5), torch.randn(80, 5), torch.randn(80)], torch.float32,
                        grads_of)
    check_against_torch(lambda x, w, backend: ops.eca_gate(x, w, backend=backend), [x, torch.randn(7)],
                        torch.float32, grads_of)


def test_kernels_take_strided_inputs_and_expanded_gradients(poison_empty):
    # q, k, v as a model makes them: views of one projection, permuted; out.sum() sends a stride-0 gradient
    qkv = torch.randn(2, 33, 3, 2, 16).permute(2, 0, 3, 1, 4)  # [3, B, H, N, D], not contiguous
    q, k, v = (t.requires_grad_() for t in qkv.detach().clone().unbind(0))
    for fn in (lambda q, k, v, be: ops.local_attention_1d(q, k, v, window=5, backend=be),
               lambda q, k, v, be: ops.linear_attention(q, k, v, feature_map='elu+1', causal=True, backend=be)):
        out = fn(q, k, v, 'triton')
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        ref = fn(q, k, v, 'torch')
        torch.testing.assert_close(out, ref, **TOL[torch.float32])
        for got, want in zip(grads, torch.autograd.grad(ref.sum(), (q, k, v))):
            torch.testing.assert_close(got, want, **TOL[torch.float32])
    x = torch.randn(2, 5, 4, 6).to(memory_format=torch.channels_last)
    w = torch.randn(1, 1, 3)
    torch.testing.assert_close(ops.eca_gate(x, w, backend='triton'), ops.eca_gate(x, w, backend='torch'))


@pytest.mark.parametrize('hs,ws', [(1, 5), (5, 1)])
def test_criss_cross_kernels_on_a_single_row_or_column(hs, ws, poison_empty, grads_of):
    q, k, v = torch.randn(3, 1, 2, hs, ws, 4).unbind(0)
    check_against_torch(lambda *a, backend: ops.criss_cross_attention(*a, backend=backend), [q, k, v],
                        torch.float32, grads_of)


@pytest.mark.parametrize('dilation', [1, 3])
@pytest.mark.parametrize('n,causal', [(1, False), (2, True), (5, False)])
def test_window_longer_than_the_sequence(n, causal, dilation, poison_empty, grads_of):
    q, k, v = torch.randn(3, 1, 2, n, 4).unbind(0)
    check_against_torch(lambda *a, backend: ops.local_attention_1d(*a, window=9, dilation=dilation, causal=causal,
                                                                   backend=backend),
                        [q, k, v], torch.float32, grads_of)
