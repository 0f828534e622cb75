"""Kronecker attention against a float64 reference written from the paper's operators: the row and column averages
juxtaposed, ``O = V softmax(Kᵀ Q)`` with the paper's query/key/value choice for KAO_QKV (all from the averages, the
map rebuilt by the outer sum or product of its row and column outputs) and KAO_KV (queries from every position), and
the block's output conv, norm and residual; output, input and every parameter gradient at odd sizes and 1×1, train
and eval, heads, scaling; the identity start; bf16; meta; scripting and tracing; errors."""

import sys
import warnings
from pathlib import Path

import pytest
import torch
from timm.layers import create_feature_extractor

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from test_context_blocks import _bn, _conv1x1, _normalize_rows, _randomize, check_against_reference  # noqa: E402


def _attend(q, k, v, heads, scale):
    """Per head: V softmax over the keys of (Kᵀ Q); q: [B, d, Lq], k: [B, d, Lk], v: [B, C, Lk] -> [B, C, Lq]."""
    outs = []
    for qh, kh, vh in zip(q.chunk(heads, 1), k.chunk(heads, 1), v.chunk(heads, 1)):
        a = _normalize_rows(scale * qh.transpose(1, 2) @ kh)  # [B, Lq, Lk]
        outs.append(vh @ a.transpose(1, 2))
    return torch.cat(outs, 1)


def ref_kronecker(x, P, S, training, mode='qkv', combine='sum', heads=1, scaled=False, norm=True):
    b, c, h, w = x.shape
    rows = x.mean(3)  # R_i = 1/W Σ_j X_ij: [B, C, H]
    cols = x.mean(2)  # L_j = 1/H Σ_i X_ij: [B, C, W]
    m = torch.cat([rows, cols], -1)  # [R; L]: [B, C, H + W]
    k, v = _conv1x1(m, P, 'key'), _conv1x1(m, P, 'value')
    scale = (k.shape[1] // heads) ** -0.5 if scaled else 1.0
    if mode == 'kv':
        y = _attend(_conv1x1(x.flatten(2), P, 'query'), k, v, heads, scale).view(b, c, h, w)
    else:
        o = _attend(_conv1x1(m, P, 'query'), k, v, heads, scale)  # [B, C, H + W]
        o_r, o_l = o[:, :, :h], o[:, :, h:]
        y = o_r[..., :, None] + o_l[..., None, :] if combine == 'sum' else o_r[..., :, None] * o_l[..., None, :]
    y = _conv1x1(y.flatten(2), P, 'out', bias=not norm)  # the output conv after the outer sum, as written
    if norm:
        y = _bn(y, P, S, 'norm', training)
    return x + y.view_as(x)


@pytest.mark.parametrize('shape', [(2, 16, 7, 9), (1, 16, 13, 17), (2, 16, 1, 1)])
@pytest.mark.parametrize('kwargs', [
    dict(), dict(mode='kv'), dict(combine='product'), dict(num_heads=4, scaled=True, rd_channels=8),
    dict(norm_layer=None), dict(mode='kv', num_heads=2, norm_layer=None),
])
def test_reference(shape, kwargs):
    m = visattn.create_attn('kronecker', shape[1], **kwargs)
    ref_kw = dict(mode=kwargs.get('mode', 'qkv'), combine=kwargs.get('combine', 'sum'),
                  heads=kwargs.get('num_heads', 1), scaled=kwargs.get('scaled', False),
                  norm='norm_layer' not in kwargs)
    check_against_reference(m, lambda *a: ref_kronecker(*a, **ref_kw), torch.randn(shape) * 0.5,
                            training=shape[0] > 1)


def test_qkv_output_is_an_outer_sum():
    """With the default outer sum, Y_ij - Y_i'j - Y_ij' + Y_i'j' = 0: the attention term has rank-one structure in
    (row, column); the product combine does not."""
    torch.manual_seed(0)
    for combine, zero in (('sum', True), ('product', False)):
        m = _randomize(visattn.create_attn('kronecker', 8, combine=combine, norm_layer=None).double()).eval()
        x = torch.randn(1, 8, 5, 6, dtype=torch.float64)
        with torch.no_grad():
            y = m(x) - x
        mixed = y[..., 1:, 1:] - y[..., :-1, 1:] - y[..., 1:, :-1] + y[..., :-1, :-1]
        assert (mixed.abs().max() < 1e-10) == zero


def test_identity_at_start_and_parameter_count():
    x = torch.randn(2, 32, 7, 9)
    for kwargs in (dict(), dict(mode='kv'), dict(norm_layer=None)):
        torch.testing.assert_close(visattn.create_attn('kronecker', 32, **kwargs).train()(x), x)
    m = visattn.create_attn('kronecker', 512)
    assert m.mode == 'qkv' and m.combine == 'sum' and m.scale == 1.0
    assert sum(p.numel() for p in m.parameters()) == 4 * 512 * 512 + 3 * 512 + 2 * 512
    meta = visattn.info('kronecker')
    assert meta.family == 'context' and f'arXiv:{meta.arxiv}' in sys.modules[type(m).__module__].__doc__


@pytest.mark.parametrize('mode', ['qkv', 'kv'])
def test_bf16_and_meta(mode):
    m32 = _randomize(visattn.create_attn('kronecker', 32, mode=mode)).eval()
    m16 = visattn.create_attn('kronecker', 32, mode=mode, dtype=torch.bfloat16).eval()
    m16.load_state_dict(m32.state_dict())
    x = torch.randn(2, 32, 13, 17) * 0.3
    with torch.no_grad():
        y32, y16 = m32(x), m16(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
    assert (y16.float() - y32).abs().max() <= 0.05 * y32.abs().max()
    meta = visattn.create_attn('kronecker', 32, mode=mode, device='meta')
    assert meta(torch.empty(2, 32, 7, 9, device='meta')).shape == (2, 32, 7, 9)


@pytest.mark.parametrize('kwargs', [dict(), dict(mode='kv'), dict(combine='product', norm_layer=None)])
def test_scripts_and_traces(kwargs):
    m = _randomize(visattn.create_attn('kronecker', 16, **kwargs)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        scripted = torch.jit.script(m)
    x = torch.randn(2, 16, 7, 9)
    torch.testing.assert_close(scripted(x), m(x))
    traced = create_feature_extractor(torch.nn.Sequential(m).eval(), ['0'])
    torch.testing.assert_close(traced(x)['0'], m(x))


@pytest.mark.parametrize('kwargs, exc, match', [
    (dict(mode='qk'), ValueError, 'mode'), (dict(combine='max'), ValueError, 'combine'),
    (dict(num_heads=0), ValueError, 'num_heads'), (dict(num_heads=3), ValueError, 'divisible by num_heads'),
    (dict(rd_ratio=0.0), ValueError, 'rd_ratio'), (dict(num_heads=2.0), TypeError, 'num_heads'),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        visattn.create_attn('kronecker', 16, **kwargs)
    with pytest.raises(ValueError, match='expected 16'):
        visattn.create_attn('kronecker', 16)(torch.randn(1, 8, 3, 3))
