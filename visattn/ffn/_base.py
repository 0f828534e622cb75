"""What the feed-forward layers share: timm ``Mlp``'s constructor arguments, checked once, and the input check.

timm's ViT ``Block`` builds its feed-forward layer as ``mlp_layer(in_features=dim, hidden_features=int(dim *
mlp_ratio), act_layer=act_layer, norm_layer=norm_layer if scale_mlp_norm else None, bias=proj_bias,
drop=proj_drop, device=..., dtype=...)``; ``bias`` and ``drop`` may also be pairs (first layer, second layer), as
timm's ``Mlp`` takes them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._utils import check_int, check_prob, is_fx_proxy

__all__ = ['check_features', 'feature_pair', 'optional_features']


def optional_features(name: str, value: int | None, default: int) -> int:
    """A width argument that may be None (then ``default``): else an int >= 1 (0 is refused, not read as None)."""
    return default if value is None else check_int(name, value)


def feature_pair(name: str, value, check=None) -> tuple:
    """``value`` or the pair ``(first, second)`` it gives, as timm's ``to_2tuple``; each checked by ``check(name,
    item)`` (default: a probability for ``drop``, a bool for ``bias``)."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2:
        raise ValueError(f'{name} must be one value or a (first, second) pair, got {value!r}')
    if check is not None:
        return tuple(check(name, v) for v in pair)
    if name == 'bias':
        for v in pair:
            if not isinstance(v, bool):
                raise TypeError(f'bias must be a bool or a pair of bools, got {value!r}')
        return pair
    return tuple(check_prob(name, v) for v in pair)


def check_features(x: Tensor, in_features: int, layer: str) -> None:
    """Raise a ``ValueError`` naming ``layer`` unless ``x`` is ``[..., in_features]``. Runs under TorchScript and
    ``torch.compile``; skipped for a ``torch.fx`` proxy (the layers are leaves of timm's tracer)."""
    if not torch.jit.is_scripting():
        if is_fx_proxy(x):
            return
        if not isinstance(x, Tensor):
            raise TypeError(f'{layer}: x must be a torch.Tensor [..., {in_features}], got {type(x).__name__}')
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f'{layer}: x must be [..., {in_features}], got shape {list(x.shape)}')
