"""Shared pieces of the float64 references of the grid attention mixers (na, window, emsa, sra): random weights, the
projections written as plain matmuls, a dense masked softmax, and the check of outputs and every gradient."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

import visattn


def build(name: str, dim: int, heads: int, seed: int = 0, **kw) -> torch.nn.Module:
    """The mixer in float64 with N(0, 0.4²) parameters (LayerNorm weights around 1), in eval mode."""
    torch.manual_seed(seed)
    m = visattn.create_mixer(name, dim, num_heads=heads, dtype=torch.float64, **kw)
    with torch.no_grad():
        for pname, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * 0.4 + (1. if pname.endswith('norm.weight') else 0.))
    return m.eval()


def split(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, h·d] -> [B, h, N, d]."""
    B, N, C = t.shape
    return t.view(B, N, heads, C // heads).transpose(1, 2)


def linear(t: torch.Tensor, params: dict, name: str, rows: slice = slice(None)) -> torch.Tensor:
    """``t W[rows]ᵀ + b[rows]`` of the Linear ``name`` (no bias where it has none)."""
    bias = params[f'{name}.bias'][rows] if f'{name}.bias' in params else None
    return torch.nn.functional.linear(t, params[f'{name}.weight'][rows], bias)


def qkv(m: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, h, N, d] of every token, from the ``qkv`` weights."""
    params, C = dict(m.named_parameters()), x.shape[-1]
    return tuple(split(linear(x, params, 'qkv', slice(i * C, (i + 1) * C)), m.num_heads) for i in range(3))


def softmax_over(q, k, v, allowed: torch.Tensor, scale: float, bias=None) -> torch.Tensor:
    """``softmax(q kᵀ·scale + bias)`` over the keys ``allowed`` (bool, broadcast to [B, h, N, M]), times v."""
    logits = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        logits = logits + bias
    return torch.softmax(logits.masked_fill(~allowed, float('-inf')), -1) @ v


def with_prefix(patch_allowed: torch.Tensor, P: int) -> torch.Tensor:
    """The mixer contract's rule over ``N = P + n`` tokens: prefix rows see everything, patch rows see the prefix
    keys and their ``patch_allowed`` [n, n] keys."""
    n = patch_allowed.shape[0]
    allowed = torch.ones(P + n, P + n, dtype=torch.bool)
    allowed[P:, P:] = patch_allowed
    return allowed


def out_proj(m: torch.nn.Module, out: torch.Tensor) -> torch.Tensor:
    """[B, h, N, d] -> heads concatenated, then ``proj``: [B, N, C]."""
    B, h, N, d = out.shape
    return linear(out.transpose(1, 2).reshape(B, N, h * d), dict(m.named_parameters()), 'proj')


def assert_matches(m: torch.nn.Module, x: torch.Tensor, reference: Callable[[torch.Tensor], torch.Tensor],
                   tol: float = 1e-10, **call) -> None:
    """``m(x, **call)`` equals ``reference(x)`` (which reads ``m``'s parameters), and so do the gradients of ``x``
    and of every parameter under a random cotangent."""
    params = dict(m.named_parameters())
    g = torch.randn(x.shape, dtype=x.dtype)
    results = []
    for fn in (lambda t: m(t, **call), reference):
        xi = x.detach().clone().requires_grad_()
        y = fn(xi)
        results.append((y, torch.autograd.grad((y * g).sum(), [xi, *params.values()], allow_unused=True)))
    (y, got), (want, exp) = results
    torch.testing.assert_close(y, want, rtol=tol, atol=tol)
    for name, a, b in zip(['x', *params], got, exp):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f'gradient of {name}')


def receptive_field(m: torch.nn.Module, x: torch.Tensor, token: int, **call) -> set[int]:
    """The input tokens whose gradient reaches output ``token``: [N] -> set of token indices."""
    xi = x.detach().clone().requires_grad_()
    m(xi, **call)[0, token].square().sum().backward()
    return set(torch.nonzero(xi.grad[0].abs().sum(-1) > 0).flatten().tolist())


def script(m: torch.nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script(m)`` without its deprecation warning."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        return torch.jit.script(m)


def assert_scripts(m: torch.nn.Module, x: torch.Tensor, **call) -> None:
    """The scripted ``m`` computes what eager ``m`` computes on ``x``."""
    scripted = script(m)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x, **call), m(x, **call), rtol=1e-5, atol=1e-6)
