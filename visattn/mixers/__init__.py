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
from .aft import AFTFull, AFTLocal, AFTSimple
from .clustering import ClusteredAttention, RoutingAttention
from .compressed import MemoryCompressedAttention
from .fourier import FNetMixer
from .hashing import ReformerAttention
from .linear import EfficientAttention, FastAttention, LinearAttention, Performer
from .lowrank import Linformer, Nystromformer
from .poolformer import PoolGridMixer
from .probsparse import ProbSparseAttention
from .sinkhorn import SinkhornAttention
from .softmax import FullAttention, GroupedQueryAttention, MultiQueryAttention
from .sparse import (
    BigBirdAttention,
    LocalAttention,
    LongformerAttention,
    SparseFixedAttention,
    SparseStridedAttention,
)
from .star import StarAttention
from .synthesizer import (
    Synthesizer,
    SynthesizerDense,
    SynthesizerFactorizedDense,
    SynthesizerFactorizedRandom,
    SynthesizerMixture,
    SynthesizerRandom,
)
from .xca import CrossCovarianceAttention

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
]
