"""Backbones registered with timm on import."""

from .context import ContextResNet
from .local import AxialBottleneck, LocalAttnResNet, SasaBottleneck, halonet_cfg
from .resnet import AttnResNet, SKBottleneck
from .vit import filter_fitting_weights, vit_mixer_layer

__all__ = [
    'AttnResNet', 'AxialBottleneck', 'ContextResNet', 'filter_fitting_weights', 'halonet_cfg', 'LocalAttnResNet',
    'SasaBottleneck', 'SKBottleneck', 'vit_mixer_layer',
]

# timm model-name patterns that TorchScript cannot compile, each with the reason (timm's EXCLUDE_JIT_FILTERS).
_SPARSE_HELPERS = 'its block-sparse helpers (mixers/_sparse_utils) take an nn.Dropout module and keyword-only arguments'
_STAR_SHAPES = 'star-unpacked shape lists (x.expand(*lead, ...)), which TorchScript cannot size statically'
NOT_SCRIPTABLE: dict[str, str] = {
    'vit_small_patch16_224_bigbird': _SPARSE_HELPERS,
    'vit_small_patch16_224_clustered': f'its k-means helpers size tensors by {_STAR_SHAPES}',
    'vit_small_patch16_224_local': f'{_SPARSE_HELPERS}; so does ops.local_attention_1d, its unpadded path',
    'vit_small_patch16_224_longformer': f'{_SPARSE_HELPERS}; its global-token positions use sets, comprehension-ifs',
    'vit_small_patch16_224_probsparse': f'its query gather (gather_rows) sizes tensors by {_STAR_SHAPES}',
    'vit_small_patch16_224_reformer': _SPARSE_HELPERS,
    'vit_small_patch16_224_routing': f'{_SPARSE_HELPERS}; TorchScript hits an internal assert (ir.cpp) on its routing',
    'vit_small_patch16_224_sinkhorn': _SPARSE_HELPERS,
    'vit_small_patch16_224_sparse_fixed': _SPARSE_HELPERS,
    'vit_small_patch16_224_sparse_strided': _SPARSE_HELPERS,
    'vit_small_patch16_224_star': _SPARSE_HELPERS,
}
