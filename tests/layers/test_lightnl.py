"""LightNL against a float64 reference written from the paper's equation (the dense N×M affinity x_c x_scᵀ, then
times x_s, over H·W, a depthwise conv and BN, added to the input), on output, input and every parameter gradient, at
odd sizes and 1×1, each subsampling and both evaluation orders of the product, train and eval; the identity start;
bf16; meta; scripting and tracing; errors."""

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.layers import create_feature_extractor

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from test_context_blocks import _bn, _randomize, check_against_reference  # noqa: E402


def ref_lightnl(x, P, S, training, ratio=1.0, stride=1, subsample='stride', transform='dw'):
    b, c, h, w = x.shape
    r = max(1, int(ratio * c))
    if stride == 1:
        xs = x
    elif subsample == 'stride':
        xs = x[:, :, ::stride, ::stride]
    else:  # pooling windows clipped at the far border (ceil mode)
        rows = [x[:, :, i:i + stride] for i in range(0, h, stride)]
        pooled = []
        for row in rows:
            cells = [row[:, :, :, j:j + stride].flatten(2) for j in range(0, w, stride)]
            op = (lambda t: t.mean(-1)) if subsample == 'avg' else (lambda t: t.amax(-1))
            pooled.append(torch.stack([op(cell) for cell in cells], -1))
        xs = torch.stack(pooled, -2)
    xs = xs.flatten(2)
    affinity = x.flatten(2)[:, :r].transpose(1, 2) @ xs[:, :r]  # x_c x_scᵀ: [B, N, M]
    y = (affinity @ xs.transpose(1, 2)).transpose(1, 2) / (h * w)  # [B, C, N]
    y = y.view(b, c, h, w)
    if transform == 'dw':
        y = F.conv2d(y, P['conv.weight'], padding=P['conv.weight'].shape[-1] // 2, groups=c)
    return x + _bn(y.flatten(2), P, S, 'norm', training).view_as(x)


@pytest.mark.parametrize('shape', [(2, 16, 7, 9), (1, 16, 13, 17), (2, 16, 1, 1)])
@pytest.mark.parametrize('kwargs', [
    dict(), dict(channel_ratio=0.25, stride=2), dict(channel_ratio=0.5, stride=3, subsample='avg'),
    dict(stride=2, subsample='max', kernel_size=5), dict(channel_ratio=0.25, transform='none'),
])
def test_reference(shape, kwargs):
    m = visattn.create_attn('lightnl', shape[1], **kwargs)
    ref_kw = {k: v for k, v in dict(ratio=kwargs.get('channel_ratio', 1.0), **kwargs).items() if k in (
        'ratio', 'stride', 'subsample', 'transform')}
    check_against_reference(m, lambda *a: ref_lightnl(*a, **ref_kw), torch.randn(shape), training=shape[0] > 1)


def test_both_product_orders_are_taken():
    """The cheaper association is chosen from the shapes, as the released code: N·M·(rC + C) vs (N + M)·rC·C."""
    calls = []
    real_bmm = torch.bmm

    def bmm(a, b):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return real_bmm(a, b)

    m = visattn.create_attn('lightnl', 64, channel_ratio=0.25).eval()
    torch.bmm = bmm
    try:
        m(torch.randn(1, 64, 3, 3))  # small map: the N×M affinity first
        first = calls[0]
        calls.clear()
        m(torch.randn(1, 64, 20, 20))  # large map: the rC×C product first
        second = calls[0]
    finally:
        torch.bmm = real_bmm
    assert first == ((1, 9, 16), (1, 16, 9))
    assert second == ((1, 64, 400), (1, 400, 16))


def test_identity_at_start_and_parameter_count():
    x = torch.randn(2, 32, 7, 9)
    torch.testing.assert_close(visattn.create_attn('lightnl', 32).train()(x), x)
    assert not torch.allclose(visattn.create_attn('lightnl', 32, zero_init=False)(x), x)
    m = visattn.create_attn('lightnl', 512)
    assert sum(p.numel() for p in m.parameters()) == 512 * 9 + 2 * 512  # depthwise 3×3 and BN
    assert m.rd_channels == 512 and visattn.create_attn('lightnl', 10, channel_ratio=0.25).rd_channels == 2
    meta = visattn.info('lightnl')
    assert meta.family == 'context' and f'arXiv:{meta.arxiv}' in sys.modules[type(m).__module__].__doc__


def test_bf16_and_meta():
    m32 = _randomize(visattn.create_attn('lightnl', 32, channel_ratio=0.5, stride=2)).eval()
    m16 = visattn.create_attn('lightnl', 32, channel_ratio=0.5, stride=2, dtype=torch.bfloat16).eval()
    m16.load_state_dict(m32.state_dict())
    x = torch.randn(2, 32, 13, 17)
    with torch.no_grad():
        y32, y16 = m32(x), m16(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
    assert (y16.float() - y32).abs().max() <= 0.05 * y32.abs().max()
    meta = visattn.create_attn('lightnl', 32, stride=2, device='meta')
    assert meta(torch.empty(2, 32, 7, 9, device='meta')).shape == (2, 32, 7, 9)


@pytest.mark.parametrize('subsample', ['stride', 'avg'])
def test_scripts_and_traces(subsample):
    m = _randomize(visattn.create_attn('lightnl', 16, channel_ratio=0.5, stride=2, subsample=subsample)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        scripted = torch.jit.script(m)
    x = torch.randn(2, 16, 7, 9)
    torch.testing.assert_close(scripted(x), m(x))
    traced = create_feature_extractor(torch.nn.Sequential(m).eval(), ['0'])
    torch.testing.assert_close(traced(x)['0'], m(x))


@pytest.mark.parametrize('kwargs, exc, match', [
    (dict(channel_ratio=0.0), ValueError, 'channel_ratio'), (dict(channel_ratio=1.5), ValueError, 'channel_ratio'),
    (dict(stride=0), ValueError, 'stride'), (dict(kernel_size=4), ValueError, 'kernel_size'),
    (dict(subsample='bilinear'), ValueError, 'subsample'), (dict(transform='conv'), ValueError, 'transform'),
    (dict(stride=2.0), TypeError, 'stride'),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        visattn.create_attn('lightnl', 16, **kwargs)
    with pytest.raises(ValueError, match='expected 16'):
        visattn.create_attn('lightnl', 16)(torch.randn(1, 8, 3, 3))
