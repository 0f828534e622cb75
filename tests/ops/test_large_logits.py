"""The softmax kernels at logits of magnitude 50–100, where the softmax is near one-hot and dq, dk are tiny
(~1e-5 to 1e-11) beside dv (~1): the Triton gradients in float32 against a float64 reference must err no more than
the PyTorch path's in float32 (up to a small factor), on every gradient and the output. A backward that forms
delta = rowsum(dO·O) from the forward's output, or P from a float32 log-sum-exp, leaves rounding noise of ~1e-6 in
dq and dk there. Small tiles (several per band, line and value width) in Triton's CPU interpreter."""

import pytest
import torch

import visattn.ops as ops

pytest.importorskip('triton')

DK, DV = 12, 10


def winning_pairs(shape: tuple, logit: float, shift: tuple[int, ...], dims: tuple[int, ...]):
    """float64 q, k of ``shape`` [..., DK], v and an output gradient of [..., DV]: query p scores exactly ``logit``
    (at the default scale) with the key at p + ``shift`` along ``dims`` (wrapping round), and logit·cos(angle) < logit
    with every other key (the directions are random)."""
    torch.manual_seed(42)
    q = torch.nn.functional.normalize(torch.randn(*shape, DK, dtype=torch.float64), dim=-1)
    q = q * (logit * DK ** 0.5) ** 0.5  # scale·|q|² = logit
    k = torch.roll(q, shift, dims) if shift else q.clone()  # k[p + shift] = q[p]
    return q, k, torch.randn(*shape, DV, dtype=torch.float64), torch.randn(*shape, DV, dtype=torch.float64)


def errors(fn, q, k, v, grad):
    """Max abs error of the output and of dq, dk, dv of the float32 Triton and PyTorch paths against float64."""
    def run(backend, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*inputs, backend=backend)
        return [out.double(), *(g.double() for g in torch.autograd.grad(out, inputs, grad.to(dtype)))]

    ref = run('torch', torch.float64)
    err = {b: [(got - want).abs().max().item() for got, want in zip(run(b, torch.float32), ref)]
           for b in ('torch', 'triton')}
    return err, [t.abs().max().item() for t in ref]


def check(fn, q, k, v, grad):
    err, size = errors(fn, q, k, v, grad)
    for name, got, want, scale in zip(('out', 'dq', 'dk', 'dv'), err['triton'], err['torch'], size):
        # 4× the PyTorch path's error, or float32 rounding of the largest element where that is 0
        assert got <= 4 * want + 2e-7 * scale, (
            f'{name}: Triton errs by {got:.2e}, the PyTorch float32 path by {want:.2e} (largest |{name}| {scale:.1e})')


@pytest.mark.parametrize('logit', [50, 100])
@pytest.mark.parametrize('window,dilation,causal,shift', [(9, 1, False, 0), (9, 1, True, -1), (5, 2, False, 2)])
def test_local_attention_1d_gradients_at_large_logits(logit, window, dilation, causal, shift, monkeypatch):
    from visattn.ops.local1d import triton as local_triton

    configs = local_triton._configs
    monkeypatch.setattr(local_triton, '_configs', lambda dk, dv, size: tuple(
        dict(cfg, BLOCK_M=16, BLOCK_N=16) for cfg in configs(dk, dv, size)))
    q, k, v, grad = winning_pairs((1, 2, 45), logit, (shift,) if shift else (), (2,))

    def fn(*a, backend):
        return ops.local_attention_1d(*a, window=window, dilation=dilation, causal=causal, backend=backend)

    check(fn, q, k, v, grad)


@pytest.mark.parametrize('logit', [50, 100])
@pytest.mark.parametrize('shift', [(0, 0), (0, 1), (1, 0)], ids=['self', 'in-row', 'in-column'])
def test_criss_cross_gradients_at_large_logits(logit, shift):
    # the winning key: the query's own (row pass), another of its row (row pass) or of its column (column pass)
    q, k, v, grad = winning_pairs((1, 1, 7, 9), logit, shift, (2, 3))
    check(lambda *a, backend: ops.criss_cross_attention(*a, backend=backend), q, k, v, grad)


def test_criss_cross_gradients_at_large_logits_over_several_tiles(monkeypatch):
    # several q/k tiles per line and value slices: the statistics, dq, dk and dv kernels meet the same S and dP
    from visattn.ops.criss_cross import triton as cc

    monkeypatch.setattr(cc, 'blocks', lambda length, dk, dv, size: dict(BLOCK_M=4, BLOCK_N=8, BLOCK_DK=16,
                                                                         BLOCK_DV=4))
    q, k, v, grad = winning_pairs((1, 1, 7, 9), 100, (1, 1), (2, 3))
    check(lambda *a, backend: ops.criss_cross_attention(*a, backend=backend), q, k, v, grad)
