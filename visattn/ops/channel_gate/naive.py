"""PyTorch path of the fused channel gates: the spec, and the CPU path.

``y = x · σ(excite(pool(x)))`` per channel: pooling squeezes each channel of ``x`` [B, C, H, W] to scalars,
``excite`` maps the pooled vectors to one logit per channel (SE's bottleneck MLP, CBAM's shared MLP over the
average- and max-pooled vectors, or ECA's 1-D convolution across channels), and the sigmoid gate rescales
``x``. Pooling, the excitation and the gate run in at least float32.
"""

from __future__ import annotations

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


def channel_gate_naive(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor,
                       fc2_bias: Tensor | None, pool: str = 'avg', act: str = 'relu') -> Tensor:
    """SE / CBAM-channel gate ``x · σ(Σ_p fc2(act(fc1(p))))`` over the pooled vectors p of ``pool``.

    Shapes: x [B, C, H, W]; fc1_weight [Cr, C] (or [Cr, C, 1, 1]); fc1_bias [Cr]; fc2_weight [C, Cr]
    (or [C, Cr, 1, 1]); fc2_bias [C]. Returns [B, C, H, W] in ``x``'s dtype.
    """
    logits = mlp_logits(*pool_nchw(x, pool), fc1_weight, fc1_bias, fc2_weight, fc2_bias, act)
    return (upcast(x) * torch.sigmoid(logits)[:, :, None, None]).to(x.dtype)


def eca_gate_naive(x: Tensor, conv_weight: Tensor) -> Tensor:
    """ECA gate ``x · σ(conv1d(GAP(x)))``. Shapes: x [B, C, H, W]; conv_weight [1, 1, k] (or [k]), k odd."""
    avg, _ = pool_nchw(x, 'avg')
    return (upcast(x) * torch.sigmoid(eca_logits(avg, conv_weight))[:, :, None, None]).to(x.dtype)
