"""Registration and construction helpers shared by every visattn backbone."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, register_model
from timm.models._builder import resolve_pretrained_cfg

from ..registry import register_model_name


def paper_id(paper: str) -> str:
    """``'arXiv:<id>'`` for an arXiv id, else the reference as given (a paper without an arXiv id)."""
    return f'arXiv:{paper}' if paper[:1].isdigit() else paper


def default_cfg(paper_arxiv: str, **kwargs: Any) -> dict[str, Any]:
    """A pretrained_cfg with no weights yet (ImageNet-1k defaults, 224², classifier ``fc``)."""
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc', 'paper_ids': paper_id(paper_arxiv), 'license': 'apache-2.0',
        **kwargs,
    }


def check_pretrained_source(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> None:
    """``pretrained=True`` without a weight source is an error (timm would only log a warning and return random
    weights); it names the ways to give weights."""
    if pretrained:
        cfg = resolve_pretrained_cfg(
            variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
            pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
        if not (cfg.url or cfg.hf_hub_id or cfg.file or cfg.state_dict):
            raise RuntimeError(
                f"No pretrained weights are published for '{variant}' yet. Create it with pretrained=False, or "
                "load your own file: timm.create_model(name, pretrained=True, "
                "pretrained_cfg_overlay=dict(file='weights.safetensors')).")


def build_checked(
        model_cls: Callable[..., Any],
        variant: str,
        pretrained: bool = False,
        **kwargs: Any,
) -> Any:
    """timm's ``build_model_with_cfg``, but ``pretrained=True`` without a weight source is an error."""
    check_pretrained_source(variant, pretrained, kwargs)
    return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)


def build_staged(
        model_cls: Callable[..., Any],
        variant: str,
        pretrained: bool,
        model_args: dict[str, Any],
        filter_fn: Callable[..., Any],
        default_out_indices: Sequence[int] = (0, 1, 2, 3),
        **kwargs: Any,
) -> Any:
    """`build_checked` of a backbone with ``forward_intermediates``: the variant's ``model_args`` updated by the
    caller's ``kwargs``, checkpoints mapped by ``filter_fn``, and ``features_only=True`` served by timm's
    ``'getter'`` wrapper at ``out_indices`` (a kwarg; default ``default_out_indices``)."""
    args = dict(model_args, **kwargs)
    out_indices = args.pop('out_indices', default_out_indices)
    return build_checked(model_cls, variant, pretrained, pretrained_filter_fn=filter_fn,
                         feature_cfg=dict(feature_cls='getter', out_indices=out_indices), **args)


def register_visattn_model(fn: Callable[..., Any]) -> Callable[..., Any]:
    """timm's ``register_model`` that never overwrites a name timm (or anything else) already registers."""
    name = fn.__name__
    if timm.is_model(name):
        warnings.warn(f"visattn does not register '{name}': timm already has a model of that name", stacklevel=2)
        return fn
    register_model(fn)
    register_model_name(name)
    return fn


def make_entrypoint(name: str, module: str, create: Callable[..., Any], doc: str) -> Callable[..., Any]:
    """Define ``module.name(pretrained=False, **kwargs)`` calling ``create(name, pretrained, **kwargs)`` and
    register it with timm (the loop-generated twin of a hand-written ``@register_model`` function)."""

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> Any:
        return create(name, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = module
    entrypoint.__doc__ = doc
    setattr(sys.modules[module], name, entrypoint)
    return register_visattn_model(entrypoint)


def make_entrypoints(module: str, create: Callable[..., Any], papers: dict[str, str]) -> None:
    """`make_entrypoint` for every variant of ``papers`` (name -> its paper's arXiv id or reference), documented
    ``'<name> (arXiv:<id>); see the docstring of <module>.'``."""
    for name, paper in papers.items():
        make_entrypoint(name, module, create, f'{name} ({paper_id(paper)}); see the docstring of {module}.')
