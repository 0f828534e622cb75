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
NOT_SCRIPTABLE: dict[str, str] = {
}
