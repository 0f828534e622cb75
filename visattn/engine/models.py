"""Building the model of a run: timm's factory, published or local starting weights, a small-input stem."""

from __future__ import annotations

from typing import Any

import timm
import torch.nn as nn

from .. import registry
from ..models._hub import create_pretrained
from .checkpoint import init_from


def adapt_small_input_stem(model: nn.Module) -> nn.Module:
    """Replace a ResNet's 7×7 stride-2 stem and max-pool with a 3×3 stride-1 conv (the CIFAR stem), so that
    tiny images (8×8, 32×32) keep their resolution through the first stage."""
    conv = getattr(model, 'conv1', None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, 'maxpool'):
        raise ValueError(
            f'small_input_stem needs a ResNet-style model with a conv1 Conv2d and a maxpool; '
            f'{type(model).__name__} has none')
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=False,
                            device=conv.weight.device, dtype=conv.weight.dtype)
    model.maxpool = nn.Identity()
    return model


def timm_base_name(name: str) -> str | None:
    """The timm model a visattn model is built on (``resnet50_cbam`` -> ``resnet50``,
    ``vit_small_patch16_224_aft_full`` -> ``vit_small_patch16_224``): the longest ``_``-separated prefix of ``name``
    that timm registers and visattn does not; None for a name visattn does not register or with no such prefix."""
    ours = registry.list_models()
    if name not in ours:
        return None
    parts = name.split('_')
    for i in range(len(parts) - 1, 0, -1):
        prefix = '_'.join(parts[:i])
        if timm.is_model(prefix) and prefix not in ours:
            return prefix
    return None


def load_pretrained(model: nn.Module, name: str, log: Any = print) -> None:
    """Load timm's published weights of ``name`` or, for a visattn model, of its timm base model (the attention
    parameters keep their initialisation). Needs timm's hub or a local copy of the weights (`create_pretrained`)."""
    base = timm_base_name(name)
    if base is None:
        raise ValueError(f'no published weights for {name!r} and no timm base model to take them from')
    src = create_pretrained(base)
    report = _transfer(model, src.state_dict())
    log(f'pretrained: loaded {len(report["loaded"])} tensors of {base}; '
        f'{len(report["missing"])} start fresh: {_short(report["missing"])}')


def _transfer(model: nn.Module, state: dict) -> dict[str, list[str]]:
    own = model.state_dict()
    take = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(take, strict=False)
    return {'loaded': sorted(take), 'missing': sorted(set(own) - set(take))}


def _short(names: list[str], n: int = 6) -> str:
    return ', '.join(names[:n]) + (f', ... ({len(names)} in all)' if len(names) > n else '') if names else 'none'


def report_init_from(model: nn.Module, path: str, log: Any = print) -> dict[str, list[str]]:
    """``init_from`` with a one-line report of what loaded, what starts fresh and what did not fit."""
    report = init_from(model, path)
    log(f'init-from {path}: loaded {len(report["loaded"])} tensors; fresh: {_short(report["missing"])}; '
        f'ignored: {_short(report["unexpected"])}; shape mismatch: {_short(report["mismatched"])}')
    return report


def build_classifier(args: Any, num_classes: int, log: Any = print) -> nn.Module:
    """The classification model of a run, with its starting weights (``--pretrained`` / ``--init-from``)."""
    kwargs: dict[str, Any] = dict(num_classes=num_classes, in_chans=args.in_chans)
    if args.drop_path:
        kwargs['drop_path_rate'] = args.drop_path
    has_weights = args.pretrained and timm_base_name(args.model) is None
    model = create_pretrained(args.model, **kwargs) if has_weights else timm.create_model(args.model, **kwargs)
    if args.pretrained and not has_weights:
        load_pretrained(model, args.model, log)
    if args.small_input_stem:
        adapt_small_input_stem(model)
    if args.init_from:
        report_init_from(model, args.init_from, log)
    return model
