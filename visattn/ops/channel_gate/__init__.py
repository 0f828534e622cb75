"""``channel_gate`` and ``eca_gate``: the squeeze-and-excite path fused (pool, excite, sigmoid, multiply).

Papers: "Squeeze-and-Excitation Networks", Hu et al., CVPR 2018, arXiv:1709.01507; "CBAM: Convolutional
Block Attention Module", Woo et al., ECCV 2018, arXiv:1807.06521 (channel part: shared MLP over average- and
max-pooled vectors); "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks", Wang
et al., CVPR 2020, arXiv:1910.03151.

The functions take the blocks' own weights, so a module calls, e.g. for timm-style ``SEModule`` /
``visattn.layers.se.SqueezeExcite``::

    channel_gate(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)

and for CBAM's channel gate ``pool='avgmax'``; ECA calls ``eca_gate(x, self.conv.weight)``. The Triton path
reads the map twice and writes it once (one pass to pool, one to multiply by the gate; the tiny excitation
runs between them): the two-pass floor, since the gate of a channel depends on the whole map.
"""

from __future__ import annotations

from torch import Tensor

from .._dispatch import check_tensor, resolve_backend
from .naive import (
    ACTS,
    POOLS,
    channel_gate_naive,
    eca_gate_naive,
    eca_logits,
    gate_vector,
    mlp_logits,
    pool_nchw,
)

__all__ = ['channel_gate', 'eca_gate', 'channel_gate_naive', 'eca_gate_naive', 'gate_vector', 'mlp_logits',
           'eca_logits', 'pool_nchw']


def _check_param(t: Tensor | None, name: str, op: str, shapes: tuple[tuple[int, ...], ...], x: Tensor,
                 optional: bool = False) -> None:
    if t is None:
        if optional:
            return
        raise TypeError(f'{op}: {name} must be a torch.Tensor, got None')
    if not isinstance(t, Tensor):
        raise TypeError(f'{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}')
    if tuple(t.shape) not in shapes:
        raise ValueError(f'{op}: {name} must have shape {" or ".join(str(list(s)) for s in shapes)}, '
                         f'got {list(t.shape)}')
    if t.device != x.device:
        raise ValueError(f'{op}: {name} is on {t.device}, expected {x.device} like x')
    if not t.is_floating_point():
        raise TypeError(f'{op}: {name} must be a floating tensor, got {t.dtype}')


def channel_gate(
        x: Tensor,
        fc1_weight: Tensor,
        fc1_bias: Tensor | None,
        fc2_weight: Tensor,
        fc2_bias: Tensor | None,
        *,
        pool: str = 'avg',
        act: str = 'relu',
        backend: str = 'auto',
) -> Tensor:
    """Fused SE / CBAM-channel gate ``y = x · σ(Σ_p fc2(act(fc1(p))))``.

    ``p`` runs over the pooled vectors [B, C] chosen by ``pool``: ``'avg'`` (global average pooling, SE),
    ``'max'`` (global max pooling), ``'avgmax'`` (both through the shared MLP, summed: CBAM's channel gate).

    Args:
        x: [B, C, H, W].
        fc1_weight: [Cr, C] or [Cr, C, 1, 1] (a Linear's or a 1×1 Conv2d's weight).
        fc1_bias: [Cr] or None.
        fc2_weight: [C, Cr] or [C, Cr, 1, 1].
        fc2_bias: [C] or None.
        pool: ``'avg'`` (default), ``'max'`` or ``'avgmax'``.
        act: hidden activation, ``'relu'`` (default), ``'silu'`` or ``'gelu'``.
        backend: ``'auto'`` (Triton on CUDA, else PyTorch; ``VISATTN_BACKEND`` overrides), ``'torch'`` or
            ``'triton'``.

    Returns:
        [B, C, H, W] in ``x``'s dtype (pooling, MLP and gate in float32). Differentiable in ``x`` and the
        weights. With ``'max'`` pooling on the Triton path, a channel whose maximum is tied sends the max
        gradient to every tied position (PyTorch's ``amax`` splits it among them).

    Raises:
        ValueError, TypeError: wrong shapes, dtypes, devices or arguments (the message names the argument).
    """
    op = 'channel_gate'
    check_tensor(x, 'x', op, 4, '[B, C, H, W]')
    if pool not in POOLS:
        raise ValueError(f'{op}: pool must be one of {POOLS}, got {pool!r}')
    if act not in ACTS:
        raise ValueError(f'{op}: act must be one of {tuple(ACTS)}, got {act!r}')
    c = x.shape[1]
    if not isinstance(fc1_weight, Tensor) or fc1_weight.dim() not in (2, 4):
        raise ValueError(f'{op}: fc1_weight must be a [Cr, C] or [Cr, C, 1, 1] tensor, got '
                         f'{tuple(fc1_weight.shape) if isinstance(fc1_weight, Tensor) else type(fc1_weight).__name__}')
    cr = fc1_weight.shape[0]
    _check_param(fc1_weight, 'fc1_weight', op, ((cr, c), (cr, c, 1, 1)), x)
    _check_param(fc1_bias, 'fc1_bias', op, ((cr,),), x, optional=True)
    _check_param(fc2_weight, 'fc2_weight', op, ((c, cr), (c, cr, 1, 1)), x)
    _check_param(fc2_bias, 'fc2_bias', op, ((c,),), x, optional=True)
    if resolve_backend(backend, x, op=op) == 'triton':
        from .triton import channel_gate_triton

        return channel_gate_triton(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pool=pool, act=act)
    return channel_gate_naive(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pool, act)


def eca_gate(x: Tensor, conv_weight: Tensor, *, backend: str = 'auto') -> Tensor:
    """Fused ECA gate ``y = x · σ(conv1d_k(GAP(x)))``: a 1-D convolution (no bias, zero padding (k-1)/2)
    across the channels of the average-pooled vector.

    Args:
        x: [B, C, H, W].
        conv_weight: [1, 1, k] (ECA's ``nn.Conv1d(1, 1, k)`` weight) or [k]; k odd.
        backend: ``'auto'``, ``'torch'`` or ``'triton'`` (as ``channel_gate``).

    Returns:
        [B, C, H, W] in ``x``'s dtype, differentiable in ``x`` and ``conv_weight``.

    Raises:
        ValueError, TypeError: wrong shapes, dtypes, devices or arguments (the message names the argument).
    """
    op = 'eca_gate'
    check_tensor(x, 'x', op, 4, '[B, C, H, W]')
    if not isinstance(conv_weight, Tensor):
        raise TypeError(f'{op}: conv_weight must be a torch.Tensor, got {type(conv_weight).__name__}')
    ks = conv_weight.shape[-1] if conv_weight.dim() else 0
    _check_param(conv_weight, 'conv_weight', op, ((1, 1, ks), (ks,)), x)
    if ks % 2 == 0:
        raise ValueError(f'{op}: conv_weight must have an odd kernel size k, got {ks}')
    if resolve_backend(backend, x, op=op) == 'triton':
        from .triton import eca_gate_triton

        return eca_gate_triton(x, conv_weight)
    return eca_gate_naive(x, conv_weight)
