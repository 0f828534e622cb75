"""1-D token mixers: [B, N, C] in and out, timm ViT ``attn_layer``-compatible; each registered on import."""

from ._base import TokenMixer, normalize_mask

__all__ = ['TokenMixer', 'normalize_mask']
