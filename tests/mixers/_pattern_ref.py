"""Float64 references for the fixed-pattern mixers: a dense softmax over an explicit boolean pattern, and the checks
that a module equals it (outputs and every gradient) and that a perturbed token moves exactly the outputs that see it.
"""

from __future__ import annotations

import torch


def pattern_attention(m: torch.nn.Module, x: torch.Tensor, allowed: torch.Tensor,
                      weight: torch.Tensor | None = None) -> torch.Tensor:
    """``merge_heads(softmax over allowed keys of q·k·scale) v``, with optional multiplicative ``weight`` on the
    exponentials (renormalised); a row with no allowed key gives zeros.

    ``allowed``: bool broadcastable to [B, H, N, N] (query, key); ``weight``: float, same broadcast.
    """
    q, k, v = m.split_heads(x)
    s = (q @ k.transpose(-1, -2)) * m.scale
    e = torch.exp(s - s.amax(-1, keepdim=True)) * allowed
    if weight is not None:
        e = e * weight
    denom = e.sum(-1, keepdim=True)
    p = torch.where(denom > 0, e / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(e))
    return m.merge_heads(p @ v)


def assert_same_function(m: torch.nn.Module, x: torch.Tensor, reference, call: dict | None = None,
                         tol: float = 1e-10) -> None:
    """``m(x, **call)`` equals ``reference(x)``: the outputs, the gradient of x and of every parameter."""
    call = call or {}
    grads = []
    outs = []
    for fn in (lambda t: m(t, **call), reference):
        m.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_()
        out = fn(xi)
        torch.manual_seed(1)
        out.backward(torch.randn_like(out))
        outs.append(out.detach())
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=tol, atol=tol)
    for got, want in zip(*grads):
        if want is None:
            assert got is None or got.abs().max() == 0
        else:
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def moved_rows(m: torch.nn.Module, x: torch.Tensor, j: int, call: dict | None = None) -> torch.Tensor:
    """The output rows (bool [B, N]) that change when token ``j`` is replaced by a large random token."""
    call = call or {}
    with torch.no_grad():
        out = m(x, **call)
        x2 = x.clone()
        x2[:, j] = 10 * torch.randn_like(x2[:, j])
        return (m(x2, **call) - out).abs().amax(-1) > 0


def sees(allowed: torch.Tensor, j: int) -> torch.Tensor:
    """The rows that a perturbation of token ``j`` must move: those that attend to key j in some head, and j.

    ``allowed``: bool [B, H, N, N] -> [B, N].
    """
    rows = allowed[..., j].any(1)
    rows[:, j] = True
    return rows
