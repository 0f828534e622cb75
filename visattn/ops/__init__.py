"""Kernels for the hot attention paths: one public function per op, a PyTorch path (the spec) and a Triton path.

Layout: ``ops/<op>/naive.py`` (plain PyTorch), ``ops/<op>/triton.py`` (kernels and the autograd.Function),
``ops/<op>/__init__.py`` (checks and dispatch). Triton is imported only when a Triton path runs, so
``import visattn`` works where Triton is missing. Backend rules: see ``visattn.ops._dispatch``.
"""

from ._dispatch import BACKENDS, resolve_backend
from .channel_gate import channel_gate, eca_gate
from .criss_cross import criss_cross_attention
from .halo import halo_attention_2d
from .linear import linear_attention
from .local1d import local_attention_1d
from .neighborhood import neighborhood_attention_2d

__all__ = [
    'BACKENDS', 'channel_gate', 'criss_cross_attention', 'eca_gate', 'halo_attention_2d', 'linear_attention',
    'local_attention_1d', 'neighborhood_attention_2d', 'resolve_backend',
]
