"""``linear_attention``: kernelised linear attention, non-causal and causal.

Papers: "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention", Katharopoulos,
Vyas, Pappas, Fleuret, ICML 2020, arXiv:2006.16236; the same kernel serves Performer
("Rethinking Attention with Performers", arXiv:2009.14794) after its random-feature map.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from .._dispatch import check_qkv, resolve_backend
from .naive import linear_attention_naive

__all__ = ['linear_attention', 'linear_attention_naive', 'FEATURE_MAPS']

_OP = 'linear_attention'


def _elu_plus_one(x: Tensor) -> Tensor:
    return F.elu(x) + 1


FEATURE_MAPS: dict[str, Callable[[Tensor], Tensor]] = {'elu+1': _elu_plus_one, 'relu': F.relu}


def linear_attention(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = False,
        feature_map: str | Callable[[Tensor], Tensor] | None = None,
        eps: float = 1e-6,
        backend: str = 'auto',
) -> Tensor:
    """Linear attention ``out_i = φ(q_i)·S / (φ(q_i)·z + eps)``, ``S = Σ_j φ(k_j) v_jᵀ``, ``z = Σ_j φ(k_j)``.

    The sums run over all j, or over ``j <= i`` when ``causal``. Cost O(N·Dk·Dv), memory O(N·D): no N×N
    matrix is ever formed (the causal path is chunked: the masked product inside a chunk plus the summed state of
    the chunks before it, all chunks in parallel on the Triton path).

    Args:
        q, k: [B, H, N, Dk]. Already feature-mapped (non-negative) unless ``feature_map`` is given.
        v: [B, H, N, Dv].
        causal: query i attends to keys ``j <= i`` only.
        feature_map: φ applied to ``q`` and ``k`` first: ``'elu+1'`` (Katharopoulos et al.), ``'relu'``, a
            callable, or None (default: the caller applied it).
        eps: added to the normaliser ``φ(q_i)·z`` (default 1e-6); must be > 0, so that all-zero features give
            zeros, not NaN.
        backend: ``'auto'`` (Triton on CUDA, else PyTorch; ``VISATTN_BACKEND`` overrides), ``'torch'`` or
            ``'triton'``.

    Returns:
        [B, H, N, Dv] in the inputs' dtype (float32 accumulation).

    Raises:
        ValueError, TypeError: wrong shapes, dtypes, devices or arguments (the message names the argument).
    """
    check_qkv(q, k, v, _OP, '[B, H, N, D]')
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f'{_OP}: eps must be a float in (0, inf), got {type(eps).__name__} {eps!r}')
    if not 0 < eps < math.inf:
        raise ValueError(f'{_OP}: eps must be a float in (0, inf) (it keeps the normaliser of all-zero features '
                         f'from 0, which would give NaN), got {eps!r}')
    if feature_map is not None:
        if isinstance(feature_map, str):
            if feature_map not in FEATURE_MAPS:
                raise ValueError(f'{_OP}: feature_map must be one of {sorted(FEATURE_MAPS)}, a callable or None, '
                                 f'got {feature_map!r}')
            feature_map = FEATURE_MAPS[feature_map]
        elif not callable(feature_map):
            raise TypeError(f'{_OP}: feature_map must be a str, a callable or None, got {type(feature_map).__name__}')
        q, k = feature_map(q), feature_map(k)
    if resolve_backend(backend, q, k, v, op=_OP) == 'triton':
        from .triton import linear_attention_triton

        return linear_attention_triton(q, k, v, causal=bool(causal), eps=float(eps))
    return linear_attention_naive(q, k, v, causal=bool(causal), eps=float(eps))
