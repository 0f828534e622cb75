"""LambdaLayer: a float64 reference written from the paper's equations (content lambda, position lambdas from a dense
E_{nm}), the receptive field of the lambda convolution, timm's LambdaLayer, options and errors."""

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.layers.lambda_layer import LambdaLayer as TimmLambda

from visattn.layers import LambdaLayer

sys.path.insert(0, str(Path(__file__).parent))
from _random_params import randomize  # noqa: E402
from _timm_equal import assert_same_function  # noqa: E402

C, HEADS, K = 8, 2, 4


def _bn(t, w, b, mean, var, training, eps=1e-5):
    if training:
        mean, var = t.mean((0, 2, 3)), t.var((0, 2, 3), unbiased=False)
    return (t - mean[:, None, None]) / (var[:, None, None] + eps).sqrt() * w[:, None, None] + b[:, None, None]


def position_embeddings(P, H, W, r, k):
    """E_{nm} [N, N, k] of the paper: the lambda-convolution kernel at the offset m - n inside the r×r scope (else 0),
    or the relative table at the offset clipped to the table."""
    n = torch.arange(H * W)
    dh = (n[None, :] // W - n[:, None] // W)  # key row - query row
    dw = (n[None, :] % W - n[:, None] % W)
    if r is not None:
        kernel = P['conv_lambda.weight'][:, 0, :, :, 0]  # [k, r, r]
        inside = (dh.abs() <= r // 2) & (dw.abs() <= r // 2)
        e = kernel[:, (dh + r // 2).clamp(0, r - 1), (dw + r // 2).clamp(0, r - 1)].permute(1, 2, 0)
        return e * inside[..., None]
    table = P['pos_emb']
    rh, rw = table.shape[0] // 2, table.shape[1] // 2
    return table[dh.clamp(-rh, rh) + rh, dw.clamp(-rw, rw) + rw]


def lambda_reference(x, P, *, heads, r, training=False, stride=1, pool_size=3, content=True, position=True):
    """y_n = (λ^c + λ^p_n)^T q_n with λ^c = softmax_n(K)^T V and λ^p_n = Σ_m E_{nm}^T V_m (float64)."""
    B, _, H, W = x.shape
    qkv = torch.einsum('oc,bchw->bohw', P['qkv.weight'][:, :, 0, 0], x)
    k = (P['qkv.weight'].shape[0] - P['norm_v.weight'].shape[0]) // (heads + 1)
    v = P['norm_v.weight'].shape[0]
    q, key, val = qkv[:, :heads * k], qkv[:, heads * k:heads * k + k], qkv[:, heads * k + k:]
    q = _bn(q, P['norm_q.weight'], P['norm_q.bias'], P['norm_q.running_mean'], P['norm_q.running_var'], training)
    val = _bn(val, P['norm_v.weight'], P['norm_v.bias'], P['norm_v.running_mean'], P['norm_v.running_var'], training)
    q, key, val = q.reshape(B, heads, k, H * W), key.reshape(B, k, H * W), val.reshape(B, v, H * W)
    lam = torch.zeros(B, H * W, k, v, dtype=x.dtype)
    if content:
        lam = lam + torch.einsum('bkm,bvm->bkv', torch.softmax(key, dim=-1), val)[:, None]
    if position:
        E = position_embeddings(P, H, W, r, k)
        lam = lam + torch.einsum('nmk,bvm->bnkv', E, val)
        if 'conv_lambda.bias' in P:
            lam = lam + P['conv_lambda.bias'][None, None, :, None]
    y = torch.einsum('bhkn,bnkv->bhvn', q, lam).reshape(B, heads * v, H, W)
    if stride == 2:
        y = (F.avg_pool2d(y, 3, 2, 1, count_include_pad=False) if pool_size == 3
             else F.avg_pool2d(y, 2, 2, ceil_mode=True))
    return y


def _layer(**kw):
    torch.manual_seed(0)
    kw = dict(dict(num_heads=HEADS, dim_head=K, r=3), **kw)
    m = LambdaLayer(C, dtype=torch.float64, **kw)
    return randomize(m, 0.3, lambda n, p: p.dim() == 1 and n.endswith('weight'))


def _check(m, x, training, **ref_kw):
    m.train(training)
    P = dict(m.state_dict())
    P.update(dict(m.named_parameters()))
    xs = [x.clone().requires_grad_() for _ in range(2)]
    out = m(xs[0])
    want = lambda_reference(xs[1], P, heads=m.num_heads, r=m.r, training=training, stride=m.stride,
                            pool_size=m.pool_size, **ref_kw)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    names = [n for n, _ in m.named_parameters()]
    got = torch.autograd.grad(out, [xs[0]] + [p for _, p in m.named_parameters()], g)
    exp = torch.autograd.grad(want, [xs[1]] + [P[n] for n in names], g, allow_unused=True)
    for name, a, b in zip(['x'] + names, got, exp):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, rtol=1e-9, atol=1e-10,
                                   msg=f'gradient of {name}')


@pytest.mark.parametrize('training', [False, True])
@pytest.mark.parametrize('r, hw', [(3, (7, 9)), (5, (13, 17)), (3, (1, 1)), (9, (4, 6))],
                         ids=['r3-7x9', 'r5-13x17', 'r3-1x1', 'r9-smaller-map'])
def test_lambda_conv_matches_reference(r, hw, training):
    torch.manual_seed(1)
    _check(_layer(r=r), torch.randn(2, C, *hw, dtype=torch.float64), training)


@pytest.mark.parametrize('hw', [(5, 6), (3, 4), (7, 9), (1, 1)], ids=['at-feat-size', 'smaller', 'larger', '1x1'])
def test_global_relative_lambdas_match_reference_at_any_size(hw):
    """r=None: the table is sized for feat_size=(5, 6); smaller maps use its centre, larger ones clip the offsets."""
    torch.manual_seed(1)
    _check(_layer(r=None, feat_size=(5, 6)), torch.randn(2, C, *hw, dtype=torch.float64), False)


@pytest.mark.parametrize('pool_size, hw', [(3, (7, 9)), (3, (8, 6)), (2, (7, 9))])
def test_stride_pools_after_the_layer(pool_size, hw):
    torch.manual_seed(1)
    m = _layer(stride=2, pool_size=pool_size)
    _check(m, torch.randn(2, C, *hw, dtype=torch.float64), False)
    assert m(torch.randn(1, C, *hw, dtype=torch.float64)).shape[-2:] == ((hw[0] + 1) // 2, (hw[1] + 1) // 2)


def test_lambda_bias_is_timms_constant_on_the_position_lambdas():
    torch.manual_seed(1)
    m = _layer(lambda_bias=True)
    assert 'conv_lambda.bias' in m.state_dict() and 'conv_lambda.bias' not in _layer().state_dict()
    _check(m, torch.randn(2, C, 7, 9, dtype=torch.float64), False)


def test_receptive_field_of_the_position_lambdas():
    """With r = 3 an output moves for an input outside its 3×3 scope only through the (global) content lambda: the
    change of the output minus the change of the content term is zero outside the scope and not inside it."""
    torch.manual_seed(2)
    m = _layer(r=3).eval()
    P = dict(m.state_dict())
    x = torch.randn(1, C, 9, 11, dtype=torch.float64)
    x2 = x.clone()
    x2[:, :, 4, 6] += 1.0
    with torch.no_grad():
        moved = (m(x2) - m(x)).abs().amax(1)[0]
        content = (lambda_reference(x2, P, heads=HEADS, r=3, position=False)
                   - lambda_reference(x, P, heads=HEADS, r=3, position=False))
        local = (m(x2) - m(x) - content).abs().amax(1)[0]
    inside = torch.zeros(9, 11, dtype=torch.bool)
    inside[3:6, 5:8] = True
    assert (local[~inside] < 1e-12).all() and (local[inside] > 1e-6).all()
    assert (moved[~inside] > 1e-6).all(), 'the content lambda is global'


@pytest.mark.parametrize('r, feat_size, hw, stride', [(5, None, (7, 9), 1), (9, None, (8, 6), 2),
                                                      (None, (5, 6), (5, 6), 1), (None, (4, 4), (4, 4), 2)])
def test_equals_timm(r, feat_size, hw, stride):
    """timm's LambdaLayer (r: any size; r=None: its feat_size), weights loaded into `from_timm`'s layer: outputs in
    eval and train mode, gradients in train mode. (In eval mode PyTorch 2.14's batch-norm backward returns a wrong
    input gradient for a channels-last gradient and a contiguous input, which timm's layer feeds it; ours feeds its
    norms channels-last inputs and passes gradcheck, see the conformance suite.)"""
    torch.manual_seed(0)
    theirs = TimmLambda(16, 16, feat_size=feat_size, r=r, stride=stride, num_heads=2, dim_head=4)
    randomize(theirs, 0.3, lambda n, p: p.dim() == 1 and n.endswith('weight'))
    ours = LambdaLayer.from_timm(theirs)
    assert ours.pool_size == 2 and (r is None or ours.conv_lambda.bias is not None)
    x = torch.randn(2, 16, *hw)
    assert_same_function(ours, theirs, x, training=True)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x.double()), theirs.eval()(x.double()), rtol=1e-12, atol=1e-12)


def test_eval_gradient_is_right_where_a_channels_last_gradient_comes_back():
    torch.manual_seed(3)
    m = _layer(r=3).eval()
    x = torch.randn(1, C, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-6)


def test_defaults_are_the_papers():
    m = LambdaLayer(64, stride=2)
    assert (m.dim_qk, m.num_heads, m.r, m.pool_size) == (16, 4, 23, 3)
    assert m.conv_lambda.bias is None and m.qkv.out_channels == 4 * 16 + 16 + 16
    assert isinstance(m.pool, torch.nn.AvgPool2d) and m.pool.kernel_size == 3
    assert LambdaLayer(64, dim_head=None, qk_ratio=0.5).dim_qk == 8


def test_out_channels():
    m = LambdaLayer(8, 12, num_heads=4, r=3)
    assert m(torch.randn(2, 8, 5, 7)).shape == (2, 12, 5, 7)


@pytest.mark.parametrize('kwargs, match', [
    (dict(r=4), 'r'), (dict(r=None), 'feat_size'), (dict(out_channels=10, num_heads=4), 'num_heads'),
    (dict(stride=3), 'stride'), (dict(pool_size=4), 'pool_size'), (dict(r=None, feat_size=(2, 0)), 'feat_size'),
    (dict(r=None, feat_size='x'), 'feat_size'), (dict(qk_ratio=0), 'qk_ratio'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LambdaLayer(8, **kwargs)


def test_wrong_input():
    m = LambdaLayer(8, r=3)
    with pytest.raises(ValueError, match='LambdaLayer'):
        m(torch.randn(2, 6, 5, 5))


def test_bfloat16():
    torch.manual_seed(4)
    m = LambdaLayer(16, r=3).eval()
    x = torch.randn(2, 16, 7, 9)
    y = m.to(torch.bfloat16)(x.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), m.float()(x), rtol=0.1, atol=0.1)


@pytest.mark.parametrize('r', [3, None])
def test_torchscript(r):
    m = _layer(r=r, feat_size=(4, 4)).eval()
    x = torch.randn(2, C, 5, 7, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        scripted = torch.jit.script(m)
    torch.testing.assert_close(scripted(x), m(x))
