"""Backend dispatch (auto / torch / triton / VISATTN_BACKEND) and the errors on bad input."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import visattn.ops as ops
from visattn.ops import _dispatch


def cuda_like():
    return SimpleNamespace(is_cuda=True, dtype=torch.float16)


def test_auto_picks_torch_on_cpu_and_triton_on_cuda(monkeypatch):
    monkeypatch.delenv('VISATTN_BACKEND', raising=False)
    monkeypatch.setattr(_dispatch, 'triton_available', lambda: True)
    assert _dispatch.resolve_backend('auto', torch.zeros(1), op='op') == 'torch'
    assert _dispatch.resolve_backend('auto', cuda_like(), None, op='op') == 'triton'
    monkeypatch.setattr(_dispatch, 'triton_available', lambda: False)
    assert _dispatch.resolve_backend('auto', cuda_like(), op='op') == 'torch'
    with pytest.raises(ValueError, match='triton package'):
        _dispatch.resolve_backend('triton', cuda_like(), op='op')


def test_env_overrides_auto_only(monkeypatch):
    monkeypatch.setenv('VISATTN_BACKEND', 'torch')
    monkeypatch.setattr(_dispatch, 'triton_available', lambda: True)
    assert _dispatch.resolve_backend('auto', cuda_like(), op='op') == 'torch'
    monkeypatch.setenv('VISATTN_BACKEND', 'triton')
    assert _dispatch.resolve_backend('auto', torch.zeros(1), op='op') == 'triton'  # CPU, in the interpreter
    assert _dispatch.resolve_backend('torch', torch.zeros(1), op='op') == 'torch'
    monkeypatch.setenv('VISATTN_BACKEND', 'cuda')
    with pytest.raises(ValueError, match='VISATTN_BACKEND'):
        _dispatch.resolve_backend('auto', torch.zeros(1), op='op')


def test_env_routes_the_public_function(monkeypatch):
    from visattn.ops.local1d import triton as local_triton

    calls = []
    monkeypatch.setattr(local_triton, 'local_attention_1d_triton', lambda *a, **k: calls.append(k) or a[2])
    q = torch.randn(1, 1, 5, 4)
    monkeypatch.setenv('VISATTN_BACKEND', 'triton')
    ops.local_attention_1d(q, q, q, window=3)
    assert calls and calls[0]['window'] == 3
    monkeypatch.setenv('VISATTN_BACKEND', 'torch')
    ops.local_attention_1d(q, q, q, window=3)
    ops.local_attention_1d(q, q, q, window=3, backend='auto')
    assert len(calls) == 1


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    q = torch.randn(1, 1, 5, 4)
    with pytest.raises(ValueError, match='TRITON_INTERPRET=1'):
        ops.linear_attention(q, q, q, backend='triton')


def test_float64_runs_on_torch_only():
    q = torch.rand(1, 1, 5, 4, dtype=torch.float64)
    assert ops.linear_attention(q, q, q).dtype == torch.float64
    with pytest.raises(TypeError, match="backend='torch'"):
        ops.linear_attention(q, q, q, backend='triton')


def test_unknown_backend():
    q = torch.randn(1, 1, 5, 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.local_attention_1d(q, q, q, window=3, backend='cuda')


def test_importing_visattn_loads_no_kernel_module():
    code = ('import sys, visattn, torch; q = torch.rand(1, 1, 4, 2); visattn.ops.linear_attention(q, q, q); '
            "print([m for m in sys.modules if m.startswith('visattn.ops') and 'triton' in m])")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == '[]'


q4 = torch.randn(1, 2, 6, 4)
q5 = torch.randn(1, 2, 5, 6, 4)


@pytest.mark.parametrize('call,error,match', [
    (lambda: ops.linear_attention(q4[0], q4[0], q4[0]), ValueError, r'q must be \[B, H, N, D\]'),
    (lambda: ops.linear_attention(q4, q4[..., :3], q4), ValueError, 'k must have the shape of q'),
    (lambda: ops.linear_attention(q4, q4, q4[:, :, :5]), ValueError, 'v must be'),
    (lambda: ops.linear_attention(q4, q4, q4.half()), TypeError, 'v has dtype'),
    (lambda: ops.linear_attention(q4, q4, q4.int()), TypeError, 'v must be float32'),
    (lambda: ops.linear_attention(q4, q4, q4.to('meta')), ValueError, 'v is on meta'),
    (lambda: ops.linear_attention(q4, q4, q4, feature_map='softmax'), ValueError, 'feature_map must be one of'),
    (lambda: ops.linear_attention(q4, q4, q4, feature_map=3), TypeError, 'feature_map'),
    (lambda: ops.linear_attention(q4, q4, q4, eps=-1.0), ValueError, 'eps'),
    (lambda: ops.local_attention_1d(q4, q4, q4, window=4), ValueError, 'window must be odd'),
    (lambda: ops.local_attention_1d(q4, q4, q4, window=0), ValueError, 'window must be >= 1'),
    (lambda: ops.local_attention_1d(q4, q4, q4, window=3, dilation=1.5), TypeError, 'dilation must be an int'),
    (lambda: ops.local_attention_1d(q4, q4, q4, window=3, scale=-1.0), ValueError, 'scale'),
    (lambda: ops.neighborhood_attention_2d(q4, q4, q4, kernel_size=3), ValueError, r'\[B, H, Hs, Ws, D\]'),
    (lambda: ops.neighborhood_attention_2d(q5, q5, q5, kernel_size=4), ValueError, 'kernel_size must be odd'),
    (lambda: ops.neighborhood_attention_2d(q5, q5, q5, kernel_size=7), ValueError, 'too small'),
    (lambda: ops.neighborhood_attention_2d(q5, q5, q5, kernel_size=3, dilation=2), ValueError, 'too small'),
    (lambda: ops.neighborhood_attention_2d(q5, q5, q5, kernel_size=3, rpb=torch.zeros(2, 3, 3)), ValueError,
     r'rpb must be \[H, 2k-1, 2k-1\]'),
    (lambda: ops.criss_cross_attention(q5, q5, q5[:, :, :4]), ValueError, 'v must be'),
    (lambda: ops.channel_gate(q4, torch.zeros(2, 3), None, torch.zeros(2, 2), None), ValueError, 'fc1_weight'),
    (lambda: ops.channel_gate(q4, torch.zeros(1, 2), None, torch.zeros(2, 3), None), ValueError, 'fc2_weight'),
    (lambda: ops.channel_gate(q4, torch.zeros(1, 2), torch.zeros(2), torch.zeros(2, 1), None), ValueError,
     'fc1_bias'),
    (lambda: ops.channel_gate(q4, torch.zeros(1, 2), None, torch.zeros(2, 1), None, pool='sum'), ValueError, 'pool'),
    (lambda: ops.channel_gate(q4, torch.zeros(1, 2), None, torch.zeros(2, 1), None, act='tanh'), ValueError, 'act'),
    (lambda: ops.eca_gate(q4, torch.zeros(1, 1, 4)), ValueError, 'odd kernel size'),
    (lambda: ops.eca_gate(q4, torch.zeros(2, 1, 3)), ValueError, 'conv_weight must have shape'),
    (lambda: ops.eca_gate(q4, 'w'), TypeError, 'conv_weight must be a torch.Tensor'),
])
def test_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_fully_masked_rows_give_zeros_not_nan():
    from visattn._utils import masked_softmax_fp32

    scores = torch.randn(3, 4, requires_grad=True)
    mask = torch.tensor([[True, False, True, False], [False] * 4, [True] * 4])
    p = masked_softmax_fp32(scores, mask)
    assert torch.equal(p[1], torch.zeros(4)) and torch.allclose(p[[0, 2]].sum(-1), torch.ones(2))
    p.pow(2).sum().backward()
    assert torch.isfinite(scores.grad).all()
