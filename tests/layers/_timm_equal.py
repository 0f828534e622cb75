"""The check that a visattn block computes a timm module's function: ``ours`` loads ``theirs``' state dict, then the
outputs and the gradients of the input and of every parameter (matched by name) agree in float64."""

from __future__ import annotations

import torch


def assert_same_function(
        ours: torch.nn.Module,
        theirs: torch.nn.Module,
        x: torch.Tensor,
        training: bool = False,
        out_tol: float = 1e-12,
        grad_tol: float = 1e-10,
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Outputs within ``out_tol`` and gradients within ``grad_tol`` (relative and absolute); returns both modules
    (float64, in the given mode) for further checks."""
    theirs = theirs.double().train(training)
    ours = ours.double().train(training)
    ours.load_state_dict(theirs.state_dict())
    xs = [x.double().detach().clone().requires_grad_() for _ in range(2)]
    out, want = ours(xs[0]), theirs(xs[1])
    torch.testing.assert_close(out, want, rtol=out_tol, atol=out_tol)
    theirs_params = dict(theirs.named_parameters())
    names = list(theirs_params)
    mine = dict(ours.named_parameters())
    assert set(mine) == set(names), set(mine) ^ set(names)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [xs[0]] + [mine[n] for n in names], g)
    exp = torch.autograd.grad(want, [xs[1]] + [theirs_params[n] for n in names], g)
    for name, a, b in zip(['x'] + names, got, exp):
        torch.testing.assert_close(a, b, rtol=grad_tol, atol=grad_tol, msg=f'gradient of {name}')
    return ours, theirs
