"""PyTorch path of the fused channel gates: the spec, and the CPU path.

``y = x · σ(excite(pool(x)))`` per channel: pooling squeezes each channel of ``x`` [B, C, H, W] to scalars,
``excite`` maps the pooled vectors to one logit per channel (SE's bottleneck MLP, CBAM's shared MLP over the
average- and max-pooled vectors, or ECA's 1-D convolution across channels), and the sigmoid gate rescales
``x``. Pooling, the excitation and the gate run in at least float32.

Under autograd the map's part of the backward is written by hand (``GateFn``): the gate's gradient is one
reduction ``Σ_hw dy·x`` (no product map), and ``dx = dy·g + (the pooled vectors' gradients spread over H·W)``
is one product and one in-place addition; autograd differentiates only the excitation, on [B, C] vectors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .._dispatch import upcast

ACTS = {'relu': F.relu, 'silu': F.silu, 'gelu': F.gelu}
POOLS = ('avg', 'max', 'avgmax')


def pool_nchw(x: Tensor, pool: str) -> tuple[Tensor | None, Tensor | None]:
    """The average- and/or max-pooled vectors [B, C] (None where ``pool`` does not use one), in float32."""
    xf = upcast(x)
    flat = xf.flatten(2)  # [B, C, HW]: one contiguous reduced dim is faster on a CPU than two
    avg = flat.mean(-1) if pool in ('avg', 'avgmax') else None
    mx = flat.amax(-1) if pool in ('max', 'avgmax') else None
    return avg, mx


def mlp_logits(avg: Tensor | None, mx: Tensor | None, fc1_weight: Tensor, fc1_bias: Tensor | None,
               fc2_weight: Tensor, fc2_bias: Tensor | None, act: str = 'relu') -> Tensor:
    """Gate logits [B, C] of the bottleneck MLP ``fc2(act(fc1(p)))``, summed over the given pooled vectors."""
    w1, w2 = upcast(fc1_weight.flatten(1)), upcast(fc2_weight.flatten(1))  # [Cr, C], [C, Cr]
    b1 = None if fc1_bias is None else upcast(fc1_bias)
    b2 = None if fc2_bias is None else upcast(fc2_bias)
    pooled = [p for p in (avg, mx) if p is not None]
    logits = F.linear(ACTS[act](F.linear(torch.cat(pooled), w1, b1)), w2, b2)  # both vectors in one batch
    return logits.view(len(pooled), -1, logits.shape[-1]).sum(0)


def eca_logits(avg: Tensor, conv_weight: Tensor) -> Tensor:
    """Gate logits [B, C] of ECA: a 1-D convolution across the channels of the pooled vector (zero padding)."""
    w = upcast(conv_weight.reshape(1, 1, -1))
    return F.conv1d(avg.unsqueeze(1), w, padding=(w.shape[-1] - 1) // 2).squeeze(1)


def excite_fn(kind: str, act: str) -> Callable[..., Tensor]:
    """The excitation ``(avg, mx, *params) -> logits [B, C]``: ``'mlp'`` (params fc1 weight and bias, fc2 weight
    and bias; SE, CBAM) or ``'eca'`` (params: the 1-D conv weight)."""
    if kind == 'eca':
        return lambda avg, mx, conv_weight: eca_logits(avg, conv_weight)
    return lambda avg, mx, w1, b1, w2, b2: mlp_logits(avg, mx, w1, b1, w2, b2, act)


def excite_backward(excite: Callable[..., Tensor], avg: Tensor | None, mx: Tensor | None,
                    params: list[Tensor | None], dgate: Tensor) -> tuple[Tensor, list[Tensor | None]]:
    """Back through ``σ(excite(avg, mx, *params))`` given ``dgate = Σ_hw dy·x`` [B, C] (the small vectors only):
    the logits (at least float32, detached) and the gradients of ``avg``, ``mx`` and each param (None where absent)."""
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() if t is not None else None for t in (avg, mx, *params)]
        logits = excite(*inputs)
        sig = torch.sigmoid(upcast(logits.detach()))
        wanted = [t for t in inputs if t is not None]
        grads = iter(torch.autograd.grad(logits, wanted, dgate * sig * (1 - sig), allow_unused=True))
    return upcast(logits.detach()), [next(grads) if t is not None else None for t in inputs]


def gate_vector(x: Tensor, pool: str, kind: str, act: str,
                *params: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The gate ``σ(excite(pool(x)))`` [B, C] in at least float32, with the pooled vectors it used."""
    avg, mx = pool_nchw(x, pool)
    return torch.sigmoid(excite_fn(kind, act)(avg, mx, *params)), avg, mx


class GateFn(torch.autograd.Function):
    """``x · σ(excite(pool(x)))`` on [B, C, H, W], the PyTorch path under autograd (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, pool: str, kind: str, act: str, *params: Tensor | None) -> Tensor:
        xf = upcast(x)
        gate, avg, mx = gate_vector(xf, pool, kind, act, *params)
        ctx.save_for_backward(x, *(t if t is not None else torch.empty(0) for t in (avg, mx)), *params)
        ctx.none = (avg is None, mx is None, *(p is None for p in params))
        ctx.excite = excite_fn(kind, act)
        return (xf * gate[:, :, None, None]).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, *rest = ctx.saved_tensors
        avg, mx, *params = (None if none else t for t, none in zip(rest, ctx.none))
        b, c, h, w = x.shape
        xf, dyf = upcast(x).reshape(b, c, h * w), upcast(dy).reshape(b, c, h * w)
        logits, (davg, dmax, *dparams) = excite_backward(ctx.excite, avg, mx, params, torch.linalg.vecdot(dyf, xf))
        dx = dyf * torch.sigmoid(logits)[:, :, None]
        if davg is not None:
            dx.add_((davg / (h * w))[:, :, None])
        if dmax is not None:  # amax's rule: the gradient split evenly among the positions that tie for the max
            hit = (xf == mx[:, :, None]).to(dx.dtype)
            dx.addcmul_(hit, (dmax / hit.sum(-1))[:, :, None])
        return (dx.view(b, c, h, w).to(x.dtype), None, None, None, *dparams)


def _gate(x: Tensor, pool: str, kind: str, act: str, *params: Tensor | None) -> Tensor:
    """``GateFn`` where autograd records the op, the same forward without the bookkeeping elsewhere."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params)):
        return GateFn.apply(x, pool, kind, act, *params)
    xf = upcast(x)
    return (xf * gate_vector(xf, pool, kind, act, *params)[0][:, :, None, None]).to(x.dtype)


def channel_gate_naive(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor,
                       fc2_bias: Tensor | None, pool: str = 'avg', act: str = 'relu') -> Tensor:
    """SE / CBAM-channel gate ``x · σ(Σ_p fc2(act(fc1(p))))`` over the pooled vectors p of ``pool``.

    Shapes: x [B, C, H, W]; fc1_weight [Cr, C] (or [Cr, C, 1, 1]); fc1_bias [Cr]; fc2_weight [C, Cr]
    (or [C, Cr, 1, 1]); fc2_bias [C]. Returns [B, C, H, W] in ``x``'s dtype.
    """
    return _gate(x, pool, 'mlp', act, fc1_weight, fc1_bias, fc2_weight, fc2_bias)


def eca_gate_naive(x: Tensor, conv_weight: Tensor) -> Tensor:
    """ECA gate ``x · σ(conv1d(GAP(x)))``. Shapes: x [B, C, H, W]; conv_weight [1, 1, k] (or [k]), k odd."""
    return _gate(x, 'avg', 'eca', 'relu', conv_weight)
