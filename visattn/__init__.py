"""visattn: attention mechanisms for vision and efficient transformers, as timm layers and backbones.

``import visattn`` registers every visattn model with timm, so ``timm.create_model('resnet50_cbam')`` works.
"""

from . import ffn, layers, mixers, models, ops
from .layers import reparameterize
from .registry import (
    AttnInfo,
    UnknownNameError,
    create_attn,
    create_ffn,
    create_mixer,
    get_attn,
    get_ffn,
    get_mixer,
    info,
    list_attn,
    list_families,
    list_ffns,
    list_mixers,
    list_models,
    register,
)

__version__ = '0.1.0'


def _register_fx_leaves() -> None:
    """Make every block, mixer and feed-forward class a leaf of timm's ``torch.fx`` tracer
    (``register_notrace_module``), as timm does for its own modules with shape-dependent Python: a traced model calls
    them as modules."""
    import torch.nn as nn
    from timm.layers import register_notrace_module

    for package in (layers, mixers, ffn):
        for name in package.__all__:
            obj = getattr(package, name)
            if isinstance(obj, type) and issubclass(obj, nn.Module):
                register_notrace_module(obj)


_register_fx_leaves()

__all__ = [
    'AttnInfo', 'UnknownNameError', 'create_attn', 'create_ffn', 'create_mixer', 'ffn', 'get_attn', 'get_ffn',
    'get_mixer', 'info', 'layers', 'list_attn', 'list_families', 'list_ffns', 'list_mixers', 'list_models',
    'mixers', 'models', 'register', 'ops', 'reparameterize',
]
