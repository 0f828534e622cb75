"""Layers for a ViT's feed-forward slot (timm's ``mlp_layer=``): [..., C] in, [..., C'] out; each registered on
import (``kind='ffn'``: `visattn.get_ffn`, `visattn.list_ffns`).

timm's own gated variants are not copied here: ``timm.layers.SwiGLU`` (``fc2(act(fc1_g(x)) * fc1_x(x))``) and
``timm.layers.GluMlp`` (one ``fc1`` split into value and gate) are ``mlp_layer=`` classes already.
"""

from .boom import Boom
from .pkm import ProductKeyMemory

__all__ = ['Boom', 'ProductKeyMemory']
