"""The check the feed-forward tests share: a module's output and every gradient against a float64 reference."""

from __future__ import annotations

from collections.abc import Callable

import torch


def check_against_reference(m: torch.nn.Module, x: torch.Tensor, reference: Callable[[torch.Tensor], torch.Tensor],
                            tol: float = 1e-10) -> tuple[torch.Tensor, ...]:
    """``m(x)`` equals ``reference(x)``, and so do the gradients of ``x`` and of every parameter of ``m`` (the
    reference reads the module's parameters); returns the module's gradients ``(x, *parameters)``."""
    x = x.double().requires_grad_()
    out, want = m(x), reference(x)
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    g = torch.randn_like(out)
    params = list(m.parameters())
    got = torch.autograd.grad(out, [x] + params, g)
    exp = torch.autograd.grad(want, [x] + params, g)
    for name, a, b in zip(['x'] + [n for n, _ in m.named_parameters()], got, exp):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f'gradient of {name}')
    return got
