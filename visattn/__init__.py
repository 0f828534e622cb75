"""visattn: attention mechanisms for vision and efficient transformers, as timm layers and backbones.

``import visattn`` registers every visattn model with timm, so ``timm.create_model('resnet50_cbam')`` works.
"""

from . import layers, mixers, models, ops
from .registry import (
    AttnInfo,
    UnknownNameError,
    create_attn,
    create_mixer,
    get_attn,
    get_mixer,
    info,
    list_attn,
    list_families,
    list_mixers,
    list_models,
    register,
)

__version__ = '0.1.0'

__all__ = [
    'AttnInfo', 'UnknownNameError', 'create_attn', 'create_mixer', 'get_attn', 'get_mixer', 'info', 'layers',
    'list_attn', 'list_families', 'list_mixers', 'list_models', 'mixers', 'models', 'register',
    'ops',
]
