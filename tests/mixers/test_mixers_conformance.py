"""Registry-driven conformance of every token mixer: float64 gradcheck, nothing a mask or causality hides reaches a
visible output, numeric constructor arguments refused up front, a batch of 0 and the meta device.

A mixer joins every test here by being registered; only the small tables below name mixers or arguments.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import visattn
from visattn.mixers import length_kwargs

MIXERS = visattn.list_mixers()
DIM, HEADS = 8, 2

# Sizes that keep each mechanism non-trivial at N = 7 (several blocks, buckets, clusters, landmarks), so that the
# gradcheck goes through the pattern, not through a degenerate full attention.
SMALL = {
    'adaptive_span': {'max_span': 4, 'ramp': 2, 'span_init': 0.25},  # z = 1: a soft band of 3 keys per side
    'aft_conv': {'kernel_size': 3},  # 2x3 grid: a 3x3 window, not the whole grid
    'bigbird': {'block_size': 2, 'num_random_blocks': 1},
    'block_local': {'block_size': 3},
    'blockwise': {'num_blocks': 3},
    'clustered': {'num_clusters': 3, 'bits': 4},
    'combiner': {'segment_size': 3},  # rows of 3: a direct row and two region rows
    'delta': {'chunk_size': 4},  # two chunks at N = 7: the carried fast weights too
    'dilated': {'layer_idx': 1},  # dilation 2
    'external': {'num_slots': 4},
    'fmm': {'bandwidth': 2, 'kernels': 3},
    'fourierformer': {'block_elements': 224},  # queries in blocks of 2
    'gmlp': {'gate_init_std': 0.5},  # its spatial weights start at ~1e-6 (an FFN): make them mix
    'htransformer': {'block_size': 2},  # 4 leaf blocks: level 0 and one coarse level
    'i_clustered': {'num_clusters': 3, 'bits': 4, 'topk': 2},  # 2 exact keys per cluster, the rest clustered
    'isab': {'num_inducing': 3},  # 3 inducing points for 7 tokens: a real bottleneck
    'kernelized': {'nb_features': 6},
    'lara': {'num_landmarks': 3},  # 3 proposals from segments of 3, 3 and 1 tokens
    'linformer': {'k': 3},
    'local': {'window': 3},
    'logsparse': {'local_window': 1},
    'long_short': {'window': 2, 'num_landmarks': 2, 'segment_size': 3},
    'longformer': {'window': 3, 'global_tokens': (1,)},
    'luna': {'pack_len': 3},  # 3 packed slots for 7 tokens
    'memory_compressed': {'compression': 2},
    'muse': {'kernel_sizes': (1, 3)},  # widths below N = 7: the convolutions see part of the sequence
    'momentum': {'chunk_size': 4},  # two chunks: the carried plain and momentum states too
    'na': {'kernel_size': 3, 'dilation': 2},  # 2x3 grid: each patch sees its residue class, not the whole grid
    'nystrom': {'num_landmarks': 3, 'conv_kernel_size': 3},
    'performer': {'nb_features': 6},
    'persistent': {'num_slots': 3},
    'probsparse': {'factor': 1},
    'reformer': {'bucket_size': 2, 'n_buckets': 2, 'n_hashes': 2},
    'ripple': {'num_rings': 2},  # 2x3 grid: rings 0 and 1 weighted, distance 2 in the rest
    'routing': {'num_clusters': 3},
    'scatterbrain': {'window': 3, 'nb_features': 6},
    'sinkhorn': {'bucket_size': 2},
    'skyformer': {'num_landmarks': 4},
    'soft': {'value_conv': 3},  # 2x3 grid: 1x2 landmarks, and the code's value convolution
    'sparse_fixed': {'stride': 3, 'summary': 1},
    'sparse_strided': {'stride': 3},
    'topk': {'top_k': 3},
    'vip': {'segment_dim': 4},  # 2 channels per group: the height and width FCs mix pairs (h, s)
    'window': {'window_size': 2, 'shift_size': 1},  # 2x3 grid: shifted, padded windows along W
    'yoso': {'num_hash': 4, 'hash_code_len': 3},
}

# Mixers that cannot pass a float64 gradcheck by design, with the reason. Not here: the discrete choices of the
# hashing, clustering, routing and ProbSparse mixers (buckets, k-means assignments, top-k) are constant near a
# generic input, so at a fixed seed the gradient of the piecewise-smooth function is checked like any other.
GRADCHECK_EXCLUDED: dict[str, str] = {
    'yoso': 'its backward is the paper\'s gradient estimator ((τ/2)·B in place of the derivative of B), not the '
            'gradient of its forward; tests/mixers/test_yoso.py checks it against the formula',
}

# Numeric constructor arguments for which 0 is a legitimate value (checked to build and run): an argument name
# holds for every mixer that has it, ``mixer.argument`` for that mixer only (AFT's ``local_window`` is a window
# width and must be >= 1; LogSparse's is the optional dense band, 0 = none).
ZERO_ALLOWED = {
    'attn_drop', 'proj_drop', 'num_global_blocks', 'num_random_blocks', 'seed', 'decay', 'num_prefix_tokens',
    'shift_size', 'layer_idx', 'logsparse.local_window', 'span_init',
    'muse.ffn_ratio',  # 0 = no point-wise feed-forward branch
}


def _zero_allowed(name: str, arg: str) -> bool:
    return arg in ZERO_ALLOWED or f'{name}.{arg}' in ZERO_ALLOWED


def _kwargs(name: str, seq_len: int) -> dict:
    return {**SMALL.get(name, {}), **length_kwargs(name, seq_len)}


def build(name: str, seq_len: int = 7, **kw) -> torch.nn.Module:
    return visattn.create_mixer(name, DIM, num_heads=HEADS, **{**_kwargs(name, seq_len), **kw}).eval()


def _honours_padding(name: str) -> bool:
    cls = visattn.get_mixer(name)
    return bool(cls.supports_key_padding or cls.supports_dense_mask)


def _gradcheck(fn, x: torch.Tensor) -> bool:
    # fast mode: the Jacobian against random vectors on both sides (one backward, two forwards per check), which
    # any wrong entry of the Jacobian fails as the full check does, at a fraction of its cost
    return torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize('name', [m for m in MIXERS if m not in GRADCHECK_EXCLUDED])
def test_float64_gradcheck(name):
    mixer = build(name, dtype=torch.float64)
    x = torch.randn(2, 7, DIM, dtype=torch.float64, requires_grad=True)
    assert _gradcheck(mixer, x)
    cls = visattn.get_mixer(name)
    if _honours_padding(name):
        mask = torch.tensor([[True, True, False, True, True, True, False], [False] + [True] * 6])
        assert _gradcheck(lambda t: mixer(t, attn_mask=mask), x)
    if cls.supports_causal:
        assert _gradcheck(lambda t: mixer(t, is_causal=True), x)


def test_gradcheck_exclusions_are_registered_mixers():
    assert set(GRADCHECK_EXCLUDED) <= set(MIXERS)


# A visible output may move only by float32 rounding: ULPS units in the last place of the largest visible output.
# Hidden tokens enter as exact zeros or exactly masked scores in every mixer, and on the CPU every visible output
# is bit-identical; the few ulps of slack leave room for a library kernel (SDPA, GEMM) whose blocking of a sum
# depends on what it is given. The old AFT, whose maximum included the hidden tokens, moved visible outputs by 0.1
# at a scale of 0.5 (some 10^6 ulps), and ``cumsum - x`` as the exclusive prefix of causal linear attention by
# thousands of ulps once a later token of the same chunk is large.
ULPS = 4
SCALES = (10., 100., 1000.)


def _moved(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """The largest change between ``a`` and ``b``, and the float32 rounding bound of outputs of ``a``'s scale."""
    return (a - b).abs().max().item(), ULPS * torch.finfo(torch.float32).eps * a.abs().max().item()


@pytest.mark.parametrize('name', [m for m in MIXERS if _honours_padding(m)])
def test_padded_tokens_never_reach_real_outputs(name):
    mixer = build(name, seq_len=20)
    x = torch.randn(2, 20, DIM)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0, 13:] = False
    mask[1, 2:5] = False
    with torch.no_grad():
        out = mixer(x, attn_mask=mask)
        for s in SCALES:
            moved, bound = _moved(out[mask], mixer(torch.where(mask[..., None], x, s * x), attn_mask=mask)[mask])
            assert moved <= bound, f'padded tokens x{s:g} moved real outputs by {moved:.3g} (bound {bound:.3g})'


@pytest.mark.parametrize('name', [m for m in MIXERS if visattn.info(f'mixer:{m}').supports_causal])
def test_later_tokens_never_reach_earlier_outputs(name):
    mixer = build(name, seq_len=20)
    x = torch.randn(2, 20, DIM)
    with torch.no_grad():
        out = mixer(x, is_causal=True)
        for t in (3, 11):
            for s in SCALES:
                later = x.clone()
                later[:, t + 1:] *= s
                moved, bound = _moved(out[:, :t + 1], mixer(later, is_causal=True)[:, :t + 1])
                assert moved <= bound, f'tokens after {t} x{s:g} moved earlier outputs by {moved:.3g} (<= {bound:.3g})'


def test_causal_linear_attention_prefix_is_an_exact_shift():
    from visattn.ops.linear import linear_attention_naive

    q, k, v = torch.rand(2, 2, 21, 5), torch.rand(2, 2, 21, 5), torch.randn(2, 2, 21, 6)
    out = linear_attention_naive(q, k, v, causal=True, chunk=4)  # 6 chunks: the prefix of chunk states matters
    for t in (2, 9, 13):
        for s in SCALES:
            later_k, later_v = k.clone(), v.clone()
            later_k[:, :, t + 1:] *= s
            later_v[:, :, t + 1:] *= s
            moved, bound = _moved(out[:, :, :t + 1], linear_attention_naive(q, later_k, later_v, causal=True,
                                                                            chunk=4)[:, :, :t + 1])
            assert moved <= bound, f'keys after {t} x{s:g} moved earlier outputs by {moved:.3g} (bound {bound:.3g})'


def _numeric_args(cls: type) -> list[str]:
    """Constructor arguments documented as numbers: an int or float default (not a bool), or ``int | None`` /
    ``float | None``, plus ``dim``."""
    names = ['dim']
    for p in inspect.signature(cls.__init__).parameters.values():
        default, annotation = p.default, str(p.annotation)
        if p.name in ('self', 'dim'):
            continue
        if (isinstance(default, (int, float)) and not isinstance(default, bool)) \
                or annotation in ('int | None', 'float | None'):
            names.append(p.name)
    return names


@pytest.mark.parametrize('name', MIXERS)
def test_numeric_arguments_are_checked_at_construction(name):
    cls = visattn.get_mixer(name)
    base = {'num_heads': HEADS, **_kwargs(name, 16)}
    args = _numeric_args(cls)
    assert {'dim', 'num_heads', 'attn_drop', 'proj_drop'} <= set(args)
    for arg in args:
        for value in (0, -1, 'x'):
            kw = {**base, arg: value}
            dim = kw.pop('dim', DIM)
            if value == 0 and _zero_allowed(name, arg):
                mixer = cls(dim, **kw).eval()
                assert mixer(torch.randn(1, 16, DIM)).shape == (1, 16, DIM)
                continue
            with pytest.raises((ValueError, TypeError)) as info:
                cls(dim, **kw)
            msg = str(info.value)
            assert arg in msg, f'{name}({arg}={value!r}) raised without naming {arg}: {msg}'
            if info.type is ValueError:
                assert str(value) in msg, f'{name}({arg}={value!r}) did not say which value it refused: {msg}'
    with pytest.raises((ValueError, TypeError), match='attn_drop'):
        cls(DIM, **{**base, 'attn_drop': 1.5})


def test_zero_allowed_table_names_real_arguments():
    known = {a for m in MIXERS for a in _numeric_args(visattn.get_mixer(m))}
    known |= {f'{m}.{a}' for m in MIXERS for a in _numeric_args(visattn.get_mixer(m))}
    assert ZERO_ALLOWED <= known


@pytest.mark.parametrize('name', MIXERS)
def test_batch_of_zero(name):
    mixer = build(name, seq_len=12)
    cls = visattn.get_mixer(name)
    for training in (False, True):
        mixer.train(training)
        x = torch.randn(0, 12, DIM, requires_grad=True)
        out = mixer(x)
        assert out.shape == (0, 12, DIM)
        out.sum().backward()
        if cls.supports_causal:
            assert mixer(x, is_causal=True).shape == (0, 12, DIM)
        if cls.supports_key_padding or cls.supports_dense_mask:
            assert mixer(x, attn_mask=torch.ones(0, 12, dtype=torch.bool)).shape == (0, 12, DIM)


@pytest.mark.parametrize('name', MIXERS)
def test_builds_on_the_meta_device(name):
    by_argument = build(name, device='meta')
    with torch.device('meta'):
        by_context = build(name)
    for mixer in (by_argument, by_context):
        tensors = list(mixer.parameters()) + list(mixer.buffers())
        assert all(t.device.type == 'meta' for t in tensors)
    assert [t.shape for t in by_context.parameters()] == [t.shape for t in build(name).parameters()]
    out = by_argument.eval()(torch.randn(2, 7, DIM, device='meta'))  # timm's cfg test runs forwards on meta
    assert out.shape == (2, 7, DIM) and out.device.type == 'meta'


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_routing_routes_in_float32(dtype):
    """Routing's top-w choices are discontinuous: computed in 16 bits, near-ties swap and whole clusters change.
    Given 16-bit weights, centroids and input, the 16-bit module (and fp32 under autocast) must route as float32."""
    fp32 = visattn.create_mixer('routing', 32, num_heads=2, num_clusters=8).eval()
    x = torch.randn(2, 128, 32).to(dtype).float()
    with torch.no_grad():
        for t in list(fp32.parameters()) + list(fp32.buffers()):
            t.copy_(t.to(dtype).float())
        ref = fp32(x)
        low = visattn.create_mixer('routing', 32, num_heads=2, num_clusters=8).eval()
        low.load_state_dict(fp32.state_dict())
        out = low.to(dtype)(x.to(dtype)).float()
        with torch.autocast('cpu', dtype=dtype):
            mixed = fp32(x).float()
    for got in (out, mixed):
        assert ((got - ref).norm() / ref.norm()).item() < 0.01
