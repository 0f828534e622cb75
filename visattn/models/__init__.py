"""Backbones registered with timm on import."""

from . import afnonet, s2mlp  # noqa: F401  (AFNONet, S²-MLP / S²-MLPv2: registered with timm on import)
from .context import ContextResNet
from .dat import DAT
from .gfnet import GFNet, GFNetH
from .local import AxialBottleneck, LocalAttnResNet, SasaBottleneck, halonet_cfg
from .mobilenet import attn_in_se_slot
from .mobilevit import MobileViT  # noqa: F401  (MobileViT: mobilevit_{xx_,x_,}small)
from .nat import NAT
from .poolformer import PoolFormer  # noqa: F401  (PoolFormer: poolformerv1_*)
from .reparam import RepBasicBlock, RepBottleneck
from .resnet import AttnResNet, ConvAttnBottleneck, PSABottleneck, SKBottleneck, SplatBottleneck
from .selfattn import SelfAttnResNet, cot_layer
from .shiftvit import ShiftViT
from .smlpnet import SMLPNet
from .swin import Swin
from .vit import filter_fitting_weights, track_grid, vit_mixer_layer
from .volo import VOLO  # noqa: F401  (VOLO: volo_d1 ... volo_d5)

__all__ = [
    'attn_in_se_slot', 'AttnResNet', 'AxialBottleneck', 'ContextResNet', 'ConvAttnBottleneck',
    'filter_fitting_weights', 'halonet_cfg', 'LocalAttnResNet', 'PSABottleneck', 'SasaBottleneck', 'SKBottleneck',
    'SplatBottleneck', 'track_grid', 'vit_mixer_layer',
    'SelfAttnResNet', 'cot_layer',
    'NAT',
    'DAT',
    'GFNet', 'GFNetH',
    'ShiftViT',
    'SMLPNet',
    'Swin',
    'RepBasicBlock', 'RepBottleneck',
]

# timm model-name patterns that TorchScript cannot compile, each with the reason (timm's EXCLUDE_JIT_FILTERS).
NOT_SCRIPTABLE: dict[str, str] = {
    'vit_small_patch16_224_yoso': 'YOSO back-propagates the paper\'s gradient estimator through a '
                                  'torch.autograd.Function, which TorchScript cannot compile',
}
