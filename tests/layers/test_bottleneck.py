"""BottleneckAttn (BoTNet MHSA): a float64 dense reference from the paper's equations (all-to-all softmax attention
with factorised 2-D relative logits, clipped offsets), timm's BottleneckAttn, options and errors."""

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.layers.bottleneck_attn import BottleneckAttn as TimmBottleneck

from visattn.layers import BottleneckAttn

sys.path.insert(0, str(Path(__file__).parent))
from _random_params import randomize  # noqa: E402
from _timm_equal import assert_same_function  # noqa: E402

C, HEADS = 8, 2


def mhsa_reference(x, qkv_w, rel_h, rel_w, *, heads, scale_pos_embed=True, stride=1):
    """softmax_m(s·q_n·k_m + s_r·q_n·(r^h[clip(a - i)] + r^w[clip(b - j)])) v_m for n = (i, j), m = (a, b)."""
    B, _, H, W = x.shape
    qkv = torch.einsum('oc,bchw->bohw', qkv_w[:, :, 0, 0], x)
    dv = (qkv.shape[1] - 2 * heads * rel_h.shape[1]) // heads
    dqk = rel_h.shape[1]
    q, k, v = qkv.split([heads * dqk, heads * dqk, heads * dv], 1)
    q, k, v = (t.reshape(B, heads, -1, H * W) for t in (q, k, v))
    n = torch.arange(H * W)
    rh, rw = rel_h.shape[0] // 2, rel_w.shape[0] // 2
    dh = (n[None, :] // W - n[:, None] // W).clamp(-rh, rh) + rh  # [query, key]
    dw = (n[None, :] % W - n[:, None] % W).clamp(-rw, rw) + rw
    r = rel_h[dh] + rel_w[dw]  # [N, N, d_qk]
    s = dqk ** -0.5
    logits = s * torch.einsum('bhdn,bhdm->bhnm', q, k) + (s if scale_pos_embed else 1.0) * torch.einsum(
        'bhdn,nmd->bhnm', q, r)
    y = torch.einsum('bhnm,bhdm->bhdn', torch.softmax(logits, -1), v).reshape(B, heads * dv, H, W)
    return F.avg_pool2d(y, 2, 2, ceil_mode=True) if stride == 2 else y


def _block(**kw):
    torch.manual_seed(0)
    m = BottleneckAttn(C, dtype=torch.float64, **dict(dict(num_heads=HEADS, feat_size=(5, 6)), **kw))
    return randomize(m, 0.3, lambda n, p: False)


def _check(m, x):
    xs = [x.clone().requires_grad_() for _ in range(2)]
    params = [m.qkv.weight, m.pos_embed.height_rel, m.pos_embed.width_rel]
    out = m(xs[0])
    want = mhsa_reference(xs[1], *params, heads=m.num_heads, scale_pos_embed=m.scale_pos_embed, stride=m.stride)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [xs[0]] + params, g)
    exp = torch.autograd.grad(want, [xs[1]] + params, g)
    for name, a, b in zip(['x', 'qkv', 'height_rel', 'width_rel'], got, exp):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f'gradient of {name}')


@pytest.mark.parametrize('hw', [(5, 6), (7, 9), (13, 17), (3, 2), (1, 1)],
                         ids=['at-feat-size', '7x9', '13x17-clipped', 'smaller', '1x1'])
@pytest.mark.parametrize('scale_pos_embed', [True, False])
def test_matches_reference(hw, scale_pos_embed):
    torch.manual_seed(1)
    _check(_block(scale_pos_embed=scale_pos_embed), torch.randn(2, C, *hw, dtype=torch.float64))


@pytest.mark.parametrize('hw', [(7, 9), (6, 4)])
def test_stride_pools_after_the_attention(hw):
    torch.manual_seed(1)
    m = _block(stride=2)
    _check(m, torch.randn(2, C, *hw, dtype=torch.float64))
    assert m(torch.randn(1, C, *hw, dtype=torch.float64)).shape[-2:] == ((hw[0] + 1) // 2, (hw[1] + 1) // 2)


def test_attention_is_global():
    m = _block().eval()
    x = torch.randn(1, C, 6, 7, dtype=torch.float64)
    x2 = x.clone()
    x2[:, :, 0, 0] += 1.0
    with torch.no_grad():
        assert ((m(x2) - m(x)).abs().amax(1) > 1e-8).all()


@pytest.mark.parametrize('feat_size, stride, scale_pos_embed',
                         [((7, 9), 1, False), ((6, 4), 2, True), ((1, 1), 1, False)])
def test_equals_timm(feat_size, stride, scale_pos_embed):
    torch.manual_seed(0)
    theirs = TimmBottleneck(16, 16, feat_size=feat_size, stride=stride, num_heads=2, scale_pos_embed=scale_pos_embed)
    randomize(theirs, 0.3, lambda n, p: False)
    ours = BottleneckAttn.from_timm(theirs)
    assert set(ours.state_dict()) == {'qkv.weight', 'pos_embed.height_rel', 'pos_embed.width_rel'}
    assert_same_function(ours, theirs, torch.randn(2, 16, *feat_size))
    # the same keys: a plain load works too
    plain = BottleneckAttn(16, feat_size=feat_size, stride=stride, num_heads=2, scale_pos_embed=scale_pos_embed)
    plain.load_state_dict(theirs.state_dict())


def test_defaults():
    m = BottleneckAttn(512, stride=2)
    assert m.num_heads == 4 and m.dim_head_qk == 128 and m.feat_size == (14, 14) and m.scale_pos_embed
    assert m.pos_embed.height_rel.shape == (27, 128) and m.qkv.bias is None
    assert isinstance(m.pool, torch.nn.AvgPool2d) and m.pool.kernel_size == 2
    assert BottleneckAttn(64, num_heads=4, qk_ratio=0.5).dim_head_qk == 8
    assert BottleneckAttn(8, 12, num_heads=4)(torch.randn(2, 8, 5, 7)).shape == (2, 12, 5, 7)


@pytest.mark.parametrize('kwargs, match', [
    (dict(out_channels=10, num_heads=4), 'num_heads'), (dict(stride=3), 'stride'), (dict(feat_size=0), 'feat_size'),
    (dict(feat_size=(3, 3, 3)), 'feat_size'), (dict(qk_ratio=-1), 'qk_ratio'), (dict(dim_head=0), 'dim_head'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        BottleneckAttn(8, **kwargs)


def test_wrong_input():
    with pytest.raises(ValueError, match='BottleneckAttn'):
        BottleneckAttn(8)(torch.randn(2, 8, 5))


def test_bfloat16():
    torch.manual_seed(4)
    m = BottleneckAttn(16, feat_size=4)
    x = torch.randn(2, 16, 7, 9)
    y = m.to(torch.bfloat16)(x.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), m.float()(x), rtol=0.05, atol=0.05)


def test_torchscript():
    m = _block()
    x = torch.randn(2, C, 5, 7, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        scripted = torch.jit.script(m)
    torch.testing.assert_close(scripted(x), m(x))
