"""The check shared by the kernel tests: a Triton path against the PyTorch path on output and every gradient."""

from __future__ import annotations

import torch

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-2, rtol=2e-2),
       torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}


def check_against_torch(fn, inputs, dtype, grads_of, grad_scale=1.0):
    """``fn(*inputs, backend=...)``: the Triton output and input gradients match the PyTorch path's in ``dtype``
    (``grads_of`` is the fixture of tests/ops/conftest.py; ``grad_scale`` widens the gradient tolerances)."""
    inputs = [t.to(dtype) if t is not None else None for t in inputs]
    out, grads, g = grads_of(lambda *a: fn(*a, backend='triton'), inputs)
    assert out.dtype == dtype
    assert torch.isfinite(out).all(), 'the kernel left elements unwritten (NaN-poisoned) or overflowed'
    ref, ref_grads, _ = grads_of(lambda *a: fn(*a, backend='torch'), inputs, g)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
    for i, (got, want) in enumerate(zip(grads, ref_grads)):
        assert got.dtype == want.dtype and torch.isfinite(got).all(), f'gradient of input {i} has unwritten elements'
        tol = {k: v * grad_scale for k, v in TOL[dtype].items()}
        torch.testing.assert_close(got.float(), want.float(), **tol, msg=lambda m, i=i: f'gradient of input {i}: {m}')
