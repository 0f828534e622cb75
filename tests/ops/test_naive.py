"""The PyTorch paths (naive.py) against float64 references written densely from each op's definition."""

import pytest
import torch

from visattn.ops.channel_gate import channel_gate, eca_gate
from visattn.ops.criss_cross import criss_cross_attention
from visattn.ops.linear import linear_attention
from visattn.ops.local1d import local_attention_1d
from visattn.ops.neighborhood import neighborhood_attention_2d

D64 = torch.float64


def dense_attention(q, k, v, allowed, bias=None, scale=None):
    """Softmax attention of flattened positions [B, H, P, D] over the keys marked in ``allowed`` [P, P]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        logits = logits + bias
    logits = logits.masked_fill(~allowed, float('-inf'))
    return torch.softmax(logits, -1) @ v


def compare(fn, ref, inputs, atol=1e-9):
    """Output and every input gradient of ``fn`` and ``ref`` agree (float64)."""
    a = [t.clone().requires_grad_() for t in inputs]
    b = [t.clone().requires_grad_() for t in inputs]
    out, expected = fn(*a), ref(*b)
    torch.testing.assert_close(out, expected, atol=atol, rtol=1e-7)
    g = torch.randn_like(out)
    for x, y in zip(torch.autograd.grad(out, a, g), torch.autograd.grad(expected, b, g)):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-7)


@pytest.mark.parametrize('causal', [False, True])
def test_linear_attention_matches_definition(causal):
    q, k = torch.rand(2, 2, 2, 37, 5, dtype=D64).unbind(0)
    v = torch.randn(2, 2, 37, 3, dtype=D64)

    def ref(q, k, v):
        # out_i = Σ_j (q_i·k_j) v_j / Σ_j q_i·k_j over j (<= i when causal)
        a = q @ k.transpose(-1, -2)
        if causal:
            a = a * torch.ones(37, 37, dtype=torch.bool).tril()
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)

    compare(lambda q, k, v: linear_attention(q, k, v, causal=causal, backend='torch'), ref, [q, k, v])


def test_linear_attention_chunks_do_not_change_the_result():
    from visattn.ops.linear.naive import linear_attention_naive

    q, k = torch.rand(2, 1, 2, 70, 4, dtype=D64).unbind(0)
    v = torch.randn(1, 2, 70, 6, dtype=D64)
    ref = linear_attention_naive(q, k, v, causal=True, chunk=128)
    for chunk in (1, 16, 64):
        torch.testing.assert_close(linear_attention_naive(q, k, v, causal=True, chunk=chunk), ref)


@pytest.mark.parametrize('feature_map', ['elu+1', 'relu'])
def test_linear_attention_feature_map(feature_map):
    q, k, v = torch.randn(3, 1, 2, 9, 4, dtype=D64).unbind(0)
    phi = {'elu+1': lambda t: torch.nn.functional.elu(t) + 1, 'relu': torch.relu}[feature_map]
    out = linear_attention(q, k, v, feature_map=feature_map, backend='torch')
    torch.testing.assert_close(out, linear_attention(phi(q), phi(k), v, backend='torch'))
    torch.testing.assert_close(out, linear_attention(q, k, v, feature_map=phi, backend='torch'))


@pytest.mark.parametrize('window,dilation,causal', [(5, 1, False), (3, 3, False), (1, 1, False), (4, 2, True),
                                                    (9, 1, True), (75, 1, False)])
def test_local_attention_1d_matches_definition(window, dilation, causal):
    n = 37
    q, k = torch.randn(2, 2, 3, n, 6, dtype=D64).unbind(0)
    v = torch.randn(2, 3, n, 4, dtype=D64)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    ts = range(-(window - 1), 1) if causal else range(-(window // 2), window // 2 + 1)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for t in ts:
        allowed |= j == i + dilation * t
    compare(lambda q, k, v: local_attention_1d(q, k, v, window=window, dilation=dilation, causal=causal,
                                               backend='torch'),
            lambda q, k, v: dense_attention(q, k, v, allowed), [q, k, v])


def na_reference(q, k, v, kernel_size, rpb):
    """NATTEN's neighbourhood (dilation 1) as a dense mask: the window [s, s + k) with s = clamp(i - k//2, 0, L - k)
    along each axis; the bias of key (ky, kx) for query (y, x) is rpb[:, ky - y + k - 1, kx - x + k - 1]."""
    b, h, hs, ws, _ = q.shape
    size = hs * ws
    allowed = torch.zeros(size, size, dtype=torch.bool)
    bias = torch.zeros(h, size, size, dtype=q.dtype)
    for y in range(hs):
        sy = min(max(y - kernel_size // 2, 0), hs - kernel_size)
        for x in range(ws):
            sx = min(max(x - kernel_size // 2, 0), ws - kernel_size)
            for ky in range(sy, sy + kernel_size):
                for kx in range(sx, sx + kernel_size):
                    allowed[y * ws + x, ky * ws + kx] = True
                    if rpb is not None:
                        bias[:, y * ws + x, ky * ws + kx] = rpb[:, ky - y + kernel_size - 1, kx - x + kernel_size - 1]
    flat = [t.flatten(2, 3) for t in (q, k, v)]
    return dense_attention(*flat, allowed, bias if rpb is not None else None).unflatten(2, (hs, ws))


@pytest.mark.parametrize('kernel_size,with_rpb', [(3, False), (3, True), (5, True), (7, False)])
def test_neighborhood_attention_matches_definition(kernel_size, with_rpb):
    q, k = torch.randn(2, 1, 2, 7, 9, 5, dtype=D64).unbind(0)
    v = torch.randn(1, 2, 7, 9, 3, dtype=D64)
    rpb = torch.randn(2, 2 * kernel_size - 1, 2 * kernel_size - 1, dtype=D64) if with_rpb else None
    inputs = [q, k, v] + ([rpb] if with_rpb else [])

    def fn(q, k, v, rpb=None):
        return neighborhood_attention_2d(q, k, v, kernel_size=kernel_size, rpb=rpb, backend='torch')

    compare(fn, lambda q, k, v, rpb=None: na_reference(q, k, v, kernel_size, rpb), inputs)


def test_neighborhood_attention_dilation_is_attention_on_each_subgrid():
    # DiNAT: dilation d = neighbourhood attention (dilation 1) on each of the d×d interleaved sub-grids
    q, k, v = torch.randn(3, 1, 2, 11, 10, 4, dtype=D64).unbind(0)
    rpb = torch.randn(2, 5, 5, dtype=D64)
    out = neighborhood_attention_2d(q, k, v, kernel_size=3, dilation=3, rpb=rpb, backend='torch')
    for r in range(3):
        for s in range(3):
            sub = [t[:, :, r::3, s::3] for t in (q, k, v)]
            torch.testing.assert_close(out[:, :, r::3, s::3], na_reference(*sub, 3, rpb))


def test_criss_cross_attention_matches_definition():
    hs, ws = 5, 7
    q, k = torch.randn(2, 2, 2, hs, ws, 4, dtype=D64).unbind(0)
    v = torch.randn(2, 2, hs, ws, 3, dtype=D64)
    y, x = torch.arange(hs).repeat_interleave(ws), torch.arange(ws).repeat(hs)
    allowed = (y[:, None] == y[None, :]) | (x[:, None] == x[None, :])  # row or column, the position once

    def ref(q, k, v):
        flat = [t.flatten(2, 3) for t in (q, k, v)]
        return dense_attention(*flat, allowed, scale=1.0).unflatten(2, (hs, ws))

    compare(lambda q, k, v: criss_cross_attention(q, k, v, scale=1.0, backend='torch'), ref, [q, k, v])


@pytest.mark.parametrize('pool', ['avg', 'max', 'avgmax'])
def test_channel_gate_matches_definition(pool):
    x = torch.randn(3, 8, 5, 7, dtype=D64)
    w1, b1, w2, b2 = (torch.randn(2, 8, dtype=D64), torch.randn(2, dtype=D64), torch.randn(8, 2, dtype=D64),
                      torch.randn(8, dtype=D64))

    def ref(x, w1, b1, w2, b2):
        flat = x.flatten(2)
        pooled = {'avg': [flat.mean(-1)], 'max': [flat.max(-1).values],
                  'avgmax': [flat.mean(-1), flat.max(-1).values]}[pool]
        logits = sum(torch.relu(p @ w1.T + b1) @ w2.T + b2 for p in pooled)
        return x * torch.sigmoid(logits)[:, :, None, None]

    compare(lambda *a: channel_gate(*a, pool=pool, backend='torch'), ref, [x, w1, b1, w2, b2])
    out = channel_gate(x, w1[..., None, None], None, w2[..., None, None], None, pool=pool, backend='torch')
    torch.testing.assert_close(out, ref(x, w1, torch.zeros(2, dtype=D64), w2, torch.zeros(8, dtype=D64)))


@pytest.mark.parametrize('pool', ['max', 'avgmax'])
def test_channel_gate_splits_the_max_gradient_among_ties(pool):
    """The hand-written backward follows ``amax``: a tied maximum shares its gradient evenly."""
    x = torch.randint(0, 3, (2, 6, 4, 5)).to(D64)  # many ties at the maximum of each channel
    w1, w2 = torch.randn(3, 6, dtype=D64), torch.randn(6, 3, dtype=D64)

    def ref(x, w1, w2):
        flat = x.flatten(2)
        pooled = [flat.amax(-1)] + ([flat.mean(-1)] if pool == 'avgmax' else [])
        return x * torch.sigmoid(sum(torch.relu(p @ w1.T) @ w2.T for p in pooled))[:, :, None, None]

    compare(lambda x, w1, w2: channel_gate(x, w1, None, w2, None, pool=pool, backend='torch'), ref, [x, w1, w2])


def test_eca_gate_matches_definition():
    x = torch.randn(2, 9, 4, 3, dtype=D64)
    w = torch.randn(1, 1, 5, dtype=D64)

    def ref(x, w):
        pooled = torch.nn.functional.pad(x.mean((2, 3)), (2, 2))  # zero padding across channels
        logits = torch.stack([(pooled[:, c:c + 5] * w.flatten()).sum(-1) for c in range(9)], -1)
        return x * torch.sigmoid(logits)[:, :, None, None]

    compare(lambda x, w: eca_gate(x, w, backend='torch'), ref, [x, w])


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_inputs_keep_their_dtype_and_stay_close(dtype):
    q, k, v = torch.randn(3, 1, 2, 40, 8).unbind(0)
    for fn in (lambda q, k, v: local_attention_1d(q, k, v, window=5, backend='torch'),
               lambda q, k, v: linear_attention(q, k, v, feature_map='elu+1', causal=True, backend='torch')):
        out = fn(q.to(dtype), k.to(dtype), v.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), fn(q, k, v), atol=3e-2, rtol=3e-2)
