import os

os.environ['TRITON_INTERPRET'] = '1'  # before any kernel module is imported: the kernels run in the interpreter

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # the test modules import the shared check from _compare


@pytest.fixture
def poison_empty(monkeypatch):
    """``torch.empty`` / ``torch.empty_like`` filled with NaN, so that an element a kernel leaves unwritten fails."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_fill(t):
        return t.fill_(float('nan')) if t.is_floating_point() else t

    monkeypatch.setattr(torch, 'empty', lambda *a, **k: nan_fill(empty(*a, **k)))
    monkeypatch.setattr(torch, 'empty_like', lambda *a, **k: nan_fill(empty_like(*a, **k)))


@pytest.fixture
def grads_of():
    """The ``grads_of(fn, inputs, grad_out=None)`` helper below."""
    return _grads_of


def _grads_of(fn, inputs, grad_out=None):
    """Output of ``fn(*inputs)`` and the gradients of ``(out * grad_out).sum()`` w.r.t. the tensors that require it."""
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in inputs]
    out = fn(*inputs)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    wanted = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(out, wanted, grad_out.to(out.dtype))
    return out, grads, grad_out
