"""1-D token mixers: [B, N, C] in and out, timm ViT ``attn_layer``-compatible; each registered on import."""

from ._base import (
    GridMixer,
    TokenMixer,
    combine_masks,
    grid_for_length,
    length_kwargs,
    masked_softmax,
    normalize_mask,
    softmax_attention,
)
from .aan import AverageAttention
from .adaptive_span import AdaptiveSpanAttention
from .aft import AFTConv, AFTFull, AFTLocal, AFTSimple
from .block_local import BlockLocalAttention
from .blockwise import BlockwiseAttention
from .clustering import ClusteredAttention, ImprovedClusteredAttention, RoutingAttention
from .collaborative import CollaborativeAttention
from .combiner import CombinerAttention
from .compressed import MemoryCompressedAttention
from .cosine import MixtureOfGaussianKeysAttention
from .delta import DeltaNet
from .dilated import DilatedAttention
from .emsa import EfficientMultiHeadAttention
from .external import ExternalAttentionMixer
from .flowformer import Flowformer
from .fmm import FMMAttention
from .fourier import FNetMixer
from .fourierformer import FourierFormerAttention
from .gfnet import GlobalFilterGridMixer
from .gmlp import GMLPSpatialGating
from .hashing import ReformerAttention
from .htransformer import HTransformer1DAttention
from .hypermixer import HyperMixer
from .isab import InducedSetAttention
from .kernelized import KernelizedAttention
from .lara import LinearRandomizedAttention
from .linear import EfficientAttention, FastAttention, LinearAttention, Performer
from .logsparse import LogSparseAttention
from .long_short import LongShortAttention
from .lowrank import Linformer, Nystromformer
from .luna import LunaAttention
from .mlp_mixer import MLPMixerTokenMLP
from .momentum import MomentumAttention
from .muse import MUSEAttention
from .na import NeighborhoodGridAttention
from .normalized import NormalizedAttention
from .persistent import PersistentMemoryAttention
from .poolformer import PoolGridMixer
from .probsparse import ProbSparseAttention
from .resmlp import ResMLPCrossPatch
from .ripple import RippleAttention
from .scatterbrain import ScatterbrainAttention
from .separable import SeparableSelfAttention
from .sinkformer import SinkformerAttention
from .sinkhorn import SinkhornAttention
from .skyformer import Skyformer
from .soft import SoftAttention
from .softmax import FullAttention, GroupedQueryAttention, MultiQueryAttention
from .sparse import (
    BigBirdAttention,
    LocalAttention,
    LongformerAttention,
    SparseFixedAttention,
    SparseStridedAttention,
)
from .sra import SpatialReductionAttention, convert_q_kv_state_dict
from .star import StarAttention
from .synthesizer import (
    Synthesizer,
    SynthesizerDense,
    SynthesizerFactorizedDense,
    SynthesizerFactorizedRandom,
    SynthesizerMixture,
    SynthesizerRandom,
)
from .talking_heads import TalkingHeadsAttention
from .topk import TopKAttention
from .ufo import UFOAttention
from .vip import WeightedPermuteMLP
from .window import WindowGridAttention
from .xca import CrossCovarianceAttention
from .yoso import YosoAttention

__all__ = [
    'AFTFull', 'AFTLocal', 'AFTSimple', 'BigBirdAttention', 'ClusteredAttention', 'combine_masks',
    'CrossCovarianceAttention', 'EfficientAttention', 'FastAttention', 'FNetMixer', 'FullAttention',
    'GroupedQueryAttention', 'LinearAttention', 'Linformer', 'LocalAttention', 'LongformerAttention',
    'masked_softmax', 'MemoryCompressedAttention', 'MultiQueryAttention', 'normalize_mask', 'Nystromformer',
    'Performer', 'ProbSparseAttention', 'ReformerAttention', 'RoutingAttention', 'SinkhornAttention',
    'softmax_attention', 'SparseFixedAttention', 'SparseStridedAttention', 'StarAttention', 'Synthesizer',
    'SynthesizerDense', 'SynthesizerFactorizedDense', 'SynthesizerFactorizedRandom', 'SynthesizerMixture',
    'SynthesizerRandom', 'TokenMixer',
    'GridMixer', 'grid_for_length', 'length_kwargs',
    'PoolGridMixer',
    'NeighborhoodGridAttention', 'WindowGridAttention', 'EfficientMultiHeadAttention', 'SpatialReductionAttention',
    'convert_q_kv_state_dict',
    'GlobalFilterGridMixer',
    'MLPMixerTokenMLP', 'ResMLPCrossPatch', 'GMLPSpatialGating', 'HyperMixer', 'WeightedPermuteMLP',
    'AFTConv', 'ExternalAttentionMixer', 'RippleAttention', 'SeparableSelfAttention', 'SoftAttention', 'UFOAttention',
    'AdaptiveSpanAttention', 'BlockLocalAttention', 'BlockwiseAttention', 'DilatedAttention', 'LogSparseAttention',
    'SinkformerAttention', 'TopKAttention', 'YosoAttention',
    'CombinerAttention', 'FMMAttention', 'HTransformer1DAttention', 'LongShortAttention', 'ScatterbrainAttention',
    'DeltaNet', 'Flowformer', 'FourierFormerAttention', 'KernelizedAttention', 'LinearRandomizedAttention',
    'MixtureOfGaussianKeysAttention', 'MomentumAttention', 'Skyformer',
    'CollaborativeAttention', 'MUSEAttention', 'NormalizedAttention', 'TalkingHeadsAttention',
    'AverageAttention', 'InducedSetAttention', 'LunaAttention', 'PersistentMemoryAttention',
    'ImprovedClusteredAttention',
]
