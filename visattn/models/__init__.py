"""Backbones registered with timm on import."""

from .context import ContextResNet
from .dat import DAT
from .gfnet import GFNet, GFNetH
from .local import AxialBottleneck, LocalAttnResNet, SasaBottleneck, halonet_cfg
from .mobilenet import attn_in_se_slot
from .nat import NAT
from .resnet import AttnResNet, ConvAttnBottleneck, PSABottleneck, SKBottleneck, SplatBottleneck
from .selfattn import SelfAttnResNet, cot_layer
from .shiftvit import ShiftViT
from .smlpnet import SMLPNet
from .vit import filter_fitting_weights, vit_mixer_layer

__all__ = [
    'attn_in_se_slot', 'AttnResNet', 'AxialBottleneck', 'ContextResNet', 'ConvAttnBottleneck',
    'filter_fitting_weights', 'halonet_cfg', 'LocalAttnResNet', 'PSABottleneck', 'SasaBottleneck', 'SKBottleneck',
    'SplatBottleneck', 'vit_mixer_layer',
    'SelfAttnResNet', 'cot_layer',
    'NAT',
    'DAT',
    'GFNet', 'GFNetH',
    'ShiftViT',
    'SMLPNet',
]

# timm model-name patterns that TorchScript cannot compile, each with the reason (timm's EXCLUDE_JIT_FILTERS).
NOT_SCRIPTABLE: dict[str, str] = {
}
