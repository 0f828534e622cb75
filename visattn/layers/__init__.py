"""2-D attention blocks: NCHW in, NCHW out; one mechanism per file, each registered on import."""

from .axial import AxialAttn, AxialAttnLayer
from .bam import BottleneckAttnModule
from .cbam import Cbam, ChannelGate, SpatialGate
from .cc import CrissCrossAttention
from .da import DAChannelAttention, DAPositionAttention, DualAttention
from .eca import EfficientChannelAttn, eca_kernel_size
from .efficient import EfficientAttention
from .ema import EMAttention
from .external import ExternalAttention
from .gc import GlobalContext
from .halo import HaloAttn
from .mixer2d import MixerAttn2d, sincos_2d
from .nl import NonLocal
from .sasa import SasaStem, SelfAttn2d
from .se import SqueezeExcite
from .sk import SelectiveKernel

__all__ = [
    'AxialAttn', 'AxialAttnLayer', 'BottleneckAttnModule', 'Cbam', 'ChannelGate', 'CrissCrossAttention',
    'DAChannelAttention', 'DAPositionAttention', 'DualAttention', 'eca_kernel_size', 'EfficientAttention',
    'EfficientChannelAttn', 'EMAttention', 'ExternalAttention', 'GlobalContext', 'HaloAttn', 'MixerAttn2d',
    'NonLocal', 'SasaStem', 'SelectiveKernel', 'SelfAttn2d', 'sincos_2d', 'SpatialGate', 'SqueezeExcite',
]
