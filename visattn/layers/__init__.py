"""2-D attention blocks: NCHW in, NCHW out; one mechanism per file, each registered on import."""

from .bam import BottleneckAttnModule
from .cbam import Cbam, ChannelGate, SpatialGate
from .eca import EfficientChannelAttn, eca_kernel_size
from .gc import GlobalContext
from .se import SqueezeExcite
from .sk import SelectiveKernel

__all__ = [
    'BottleneckAttnModule', 'Cbam', 'ChannelGate', 'EfficientChannelAttn', 'GlobalContext', 'SelectiveKernel',
    'SpatialGate', 'SqueezeExcite', 'eca_kernel_size',
]
