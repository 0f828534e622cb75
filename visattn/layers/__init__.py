"""2-D attention blocks: NCHW in, NCHW out; one mechanism per file, each registered on import."""

from ._reparam import reparameterize
from .a2 import DoubleAttention
from .acmix import ACmix
from .acnet import AsymConvBlock
from .afno import AFNO2d
from .axial import AxialAttn, AxialAttnLayer
from .bam import BottleneckAttnModule
from .bat import BatNonLocalAttn, BilinearAttnTransform
from .bottleneck import BottleneckAttn
from .cbam import Cbam, ChannelGate, LightCbam, LightChannelGate, LightSpatialGate, SpatialGate
from .cc import CrissCrossAttention
from .coord import CoordAttn, SimpleCoordAttn
from .cot import ContextualTransformer
from .csra import CSRAHead, with_csra_head
from .da import DAChannelAttention, DAPositionAttention, DualAttention
from .dbb import DiverseBranchBlock
from .deformable import DeformableAttn
from .eca import CircularEfficientChannelAttn, EfficientChannelAttn, EfficientChannelAttnMlp, eca_kernel_size
from .efficient import EfficientAttention
from .ela import EfficientLocalAttn
from .ema import EMAttention
from .ese import EffectiveSqueezeExcite
from .external import ExternalAttention
from .gc import GlobalContext
from .ge import GatherExcite
from .gfnet import GlobalFilter
from .halo import HaloAttn
from .ham import Hamburger
from .issa import InterlacedSparseSelfAttn
from .kronecker import KroneckerAttn
from .lambda_layer import LambdaLayer
from .lightnl import LightNonLocal
from .mixer2d import MixerAttn2d, sincos_2d
from .mobilevit import MobileVitBlock
from .na import NeighborhoodAttn, NeighborhoodAttnNHWC
from .nl import NonLocal
from .outlook import OutlookAttn
from .parnet import SkipSqueezeExcite
from .polarized import PolarizedSelfAttn
from .poolformer import PoolMixer
from .psa import PyramidSplitAttn
from .repmlp import RepMLPBlock
from .repvgg import RepVggBlock
from .s2mlp import SpatialShiftMlp
from .sasa import SasaStem, SelfAttn2d
from .se import SqueezeExcite
from .sge import SpatialGroupEnhance
from .shift import ShiftMixer
from .shuffle import ShuffleAttn
from .simam import SimAM
from .sk import SelectiveKernel
from .smlp import SparseMlp
from .splat import SplitAttn
from .strip import StripAttn
from .triplet import TripletAttn
from .window import WindowAttn, WindowAttnV2

__all__ = [
    'AxialAttn', 'AxialAttnLayer', 'BottleneckAttnModule', 'Cbam', 'ChannelGate', 'CrissCrossAttention',
    'DAChannelAttention', 'DAPositionAttention', 'DualAttention', 'eca_kernel_size', 'EfficientAttention',
    'EfficientChannelAttn', 'EMAttention', 'ExternalAttention', 'GlobalContext', 'HaloAttn', 'MixerAttn2d',
    'NonLocal', 'SasaStem', 'SelectiveKernel', 'SelfAttn2d', 'sincos_2d', 'SpatialGate', 'SqueezeExcite',
    'CSRAHead', 'DoubleAttention', 'PolarizedSelfAttn', 'SkipSqueezeExcite', 'with_csra_head',
    'CoordAttn', 'EfficientLocalAttn', 'SimpleCoordAttn', 'SplitAttn', 'StripAttn',
    'CircularEfficientChannelAttn', 'EffectiveSqueezeExcite', 'EfficientChannelAttnMlp', 'GatherExcite', 'LightCbam',
    'LightChannelGate', 'LightSpatialGate',
    'PyramidSplitAttn', 'ShuffleAttn', 'SimAM', 'SpatialGroupEnhance', 'TripletAttn',
    'AFNO2d', 'GlobalFilter', 'PoolMixer', 'ShiftMixer', 'SparseMlp', 'SpatialShiftMlp',
    'WindowAttn', 'WindowAttnV2',
    'Hamburger', 'InterlacedSparseSelfAttn', 'KroneckerAttn', 'LightNonLocal',
    'NeighborhoodAttn', 'NeighborhoodAttnNHWC',
    'ContextualTransformer', 'MobileVitBlock', 'OutlookAttn',
    'ACmix', 'DeformableAttn',
    'BatNonLocalAttn', 'BilinearAttnTransform', 'BottleneckAttn', 'LambdaLayer',
    'AsymConvBlock', 'DiverseBranchBlock', 'RepMLPBlock', 'RepVggBlock', 'reparameterize',
]
