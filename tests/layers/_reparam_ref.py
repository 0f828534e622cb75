"""Float64 references shared by the re-parameterisation tests: batch norm written out, random statistics, and the
comparison of a block with its reference on outputs and gradients (input and every parameter)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from _random_params import randomize
from torch import Tensor


def bn(y: Tensor, norm: nn.Module, training: bool) -> Tensor:
    """``γ (y − μ) / √(σ² + ε) + β`` per channel (dim 1): batch statistics (biased variance) in training, the
    running ones in eval."""
    dims = [d for d in range(y.dim()) if d != 1]
    if training:
        mean = y.mean(dims, keepdim=True)
        var = ((y - mean) ** 2).mean(dims, keepdim=True)
    else:
        shape = [1, -1] + [1] * (y.dim() - 2)
        mean, var = norm.running_mean.view(shape), norm.running_var.view(shape)
    shape = [1, -1] + [1] * (y.dim() - 2)
    return (y - mean) / torch.sqrt(var + norm.eps) * norm.weight.view(shape) + norm.bias.view(shape)


def random_block(module: nn.Module) -> nn.Module:
    """Random weights N(0, 0.3²), norm weights around 1, random running statistics; in eval mode."""
    return randomize(module, 0.3, lambda n, p: p.dim() == 1 and n.endswith('weight')).eval()


def check_against(module: nn.Module, reference: Callable[[Tensor, bool], Tensor], x: Tensor, training: bool,
                  tol: float = 1e-10) -> None:
    """``module(x)`` equals ``reference(x, training)`` in the given mode, and so do the gradients of a random
    projection of the output with respect to the input and every parameter."""
    module.train(training)
    params = [p for p in module.parameters()]
    xi = x.clone().requires_grad_()
    out = module(xi)
    xr = x.clone().requires_grad_()
    ref = reference(xr, training)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [xi, *params], g, allow_unused=True)
    want = torch.autograd.grad(ref, [xr, *params], g, allow_unused=True)
    names = ['x'] + [n for n, _ in module.named_parameters()]
    for name, a, b in zip(names, got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)
    module.eval()


def check_fusion(module: nn.Module, x: Tensor, tol: float, deploy_twin: Callable[[], nn.Module] | None = None,
                 params: tuple[str, ...] = ('reparam_conv.weight', 'reparam_conv.bias')) -> None:
    """In eval mode, the deployed module computes what the training form computes (within ``tol``) and holds only
    the parameters ``params`` (when given), a second `reparameterize` changes nothing, and its state dict loads
    strictly into ``deploy_twin()``, the deploy form built directly, which computes the same to the bit."""
    module.eval()
    with torch.no_grad():
        want = module(x)
        module.reparameterize()
        assert module.deployed
        got = module(x)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        if params:
            assert tuple(n for n, _ in module.named_parameters()) == params
        module.reparameterize()
        torch.testing.assert_close(module(x), got, rtol=0, atol=0)
        if deploy_twin is not None:
            twin = deploy_twin()
            twin.load_state_dict(module.state_dict(), strict=True)
            torch.testing.assert_close(twin.eval()(x), got, rtol=0, atol=0)


def check_scripts(module: nn.Module, x: Tensor) -> None:
    """TorchScript compiles the training form and the deployed form, and each computes the eager output."""
    module.eval()
    torch.testing.assert_close(torch.jit.script(module)(x), module(x))
    module.reparameterize()
    torch.testing.assert_close(torch.jit.script(module)(x), module(x))
