"""Random parameters and BN statistics for the block tests, so that no zero or unit init hides a wrong term."""

from __future__ import annotations

from collections.abc import Callable

import torch


def randomize(module: torch.nn.Module, scale: float, is_unit: Callable[[str, torch.Tensor], bool]) -> torch.nn.Module:
    """Parameters ``N(0, scale²)``, plus 1 where ``is_unit(name, p)`` (norm weights); BN running means
    ``N(0, 0.01)`` and variances ``U(0.5, 1.5)``. In place; returns ``module``."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * scale + (1.0 if is_unit(name, p) else 0.0))
        for name, b in module.named_buffers():
            if name.endswith('running_mean'):
                b.copy_(torch.randn_like(b) * 0.1)
            elif name.endswith('running_var'):
                b.copy_(torch.rand_like(b) + 0.5)
    return module
