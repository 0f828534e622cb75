"""MobileViT block (``mobilevit``): a float64 reference written from the paper's equations (output and every gradient,
odd sizes incl. 1×1 and sizes the patch does not divide, eval and train, options), timm's ``MobileVitBlock`` with the
same weights, the attention running in ``scaled_dot_product_attention``, bf16 and bad arguments.

Sizes that the patch does not divide: the official code (ml-cvnets ``MobileViTBlock.unfolding``) resizes the map
bilinearly to the next multiples of p and back; timm copied it, and so does this block: there is no difference.
"""

import functools
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct
from timm.models.byobnet import LayerFn
from timm.models.mobilevit import MobileVitBlock as TimmMobileVitBlock

import visattn
from visattn.layers import MobileVitBlock

sys.path.insert(0, str(Path(__file__).parent))
from _timm_equal import assert_same_function  # noqa: E402
from test_gating_blocks import _bn, _check_against_reference, _randomize  # noqa: E402

SIZES = [(7, 9), (13, 17), (1, 1), (8, 6)]


def _act(x, m):
    return x * torch.sigmoid(x) if m.act_name == 'silu' else torch.relu(x)


def _layer_norm(t, w, b, eps=1e-5):
    return (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + eps) * w + b


def _resize_matrix(n_out, n_in, dtype):
    """Bilinear resampling along one axis with ``align_corners=False``: source ``(i + 0.5) · n_in / n_out - 0.5``,
    clamped at 0, between its two neighbouring samples (the last one repeated at the end)."""
    R = torch.zeros(n_out, n_in, dtype=dtype)
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1, lam = min(i0 + 1, n_in - 1), src - i0
        R[i, i0] += 1 - lam
        R[i, i1] += lam
    return R


def _resize(x, size):
    Rh, Rw = _resize_matrix(size[0], x.shape[2], x.dtype), _resize_matrix(size[1], x.shape[3], x.dtype)
    return torch.einsum('ih,bchw,jw->bcij', Rh, x, Rw)


def _conv_bn_act(x, m, prefix, training, padding=0):
    p = dict(m.named_parameters())
    return _act(_bn(F.conv2d(x, p[prefix + '.conv.weight'], padding=padding), m, prefix + '.bn', training), m)


def _transformer_layer(t, p, prefix, heads, m):
    """Pre-norm: t + MHA(LN t), then t + MLP(LN t); MHA = softmax(q kᵀ / √d_h) v per head, then the projection."""
    L, N, d = t.shape
    dh = d // heads
    h = _layer_norm(t, p[prefix + 'norm1.weight'], p[prefix + 'norm1.bias'])
    q, k, v = (h @ p[prefix + 'attn.qkv.weight'].T + p[prefix + 'attn.qkv.bias']).split(d, -1)
    q, k, v = (z.view(L, N, heads, dh).transpose(1, 2) for z in (q, k, v))  # [L, heads, N, dh]
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)
    o = (attn @ v).transpose(1, 2).reshape(L, N, d)
    t = t + o @ p[prefix + 'attn.proj.weight'].T + p[prefix + 'attn.proj.bias']
    h = _layer_norm(t, p[prefix + 'norm2.weight'], p[prefix + 'norm2.bias'])
    h = _act(h @ p[prefix + 'mlp.fc1.weight'].T + p[prefix + 'mlp.fc1.bias'], m)
    return t + h @ p[prefix + 'mlp.fc2.weight'].T + p[prefix + 'mlp.fc2.bias']


def ref_mobilevit(x, m, training=False):
    """X_L = W_1×1 act(BN(Conv_n×n X)); resized to multiples of p where needed; for each pixel offset (a, b) inside the
    p×p patches, the sequence of the patches' pixels X_L[a::p, b::p] goes through the transformer layers and a final
    LayerNorm, and is put back; resized back; X_F = act(BN(W X)); Y = act(BN(Conv_n×n [X, X_F]))."""
    p = dict(m.named_parameters())
    n, ps = m.conv_kxk.conv.kernel_size[0], m.patch_size
    xl = _conv_bn_act(x, m, 'conv_kxk', training, n // 2)
    xl = torch.einsum('oc,bchw->bohw', p['conv_1x1.weight'].flatten(1), xl)
    B, d, H, W = xl.shape
    Hp, Wp = math.ceil(H / ps) * ps, math.ceil(W / ps) * ps
    if (Hp, Wp) != (H, W):
        xl = _resize(xl, (Hp, Wp))
    offsets = [(a, b) for a in range(ps) for b in range(ps)]
    # one sequence per (image, pixel offset in the patch): the pixels at that offset of every patch [p²·B, N, d]
    t = torch.cat([xl[:, :, a::ps, b::ps].flatten(2).transpose(1, 2) for a, b in offsets])
    for i in range(len(m.transformer)):
        t = _transformer_layer(t, p, f'transformer.{i}.', m.transformer[i].attn.num_heads, m)
    t = _layer_norm(t, p['norm.weight'], p['norm.bias'])
    out = torch.zeros_like(xl)
    for (a, b), seq in zip(offsets, t.split(B)):
        out[:, :, a::ps, b::ps] = seq.transpose(1, 2).reshape(B, d, Hp // ps, Wp // ps)
    if (Hp, Wp) != (H, W):
        out = _resize(out, (H, W))
    y = _conv_bn_act(out, m, 'conv_proj', training)
    if m.conv_fusion is None:
        return y
    return _conv_bn_act(torch.cat([x, y], 1), m, 'conv_fusion', training, n // 2)


def _with_act_name(m):
    m.act_name = 'silu' if isinstance(m.conv_kxk.bn.act, torch.nn.SiLU) else 'relu'
    return m


CASES = [(hw, False) for hw in SIZES] + [((7, 9), True)] + [
    pytest.param(hw, True, marks=pytest.mark.slow) for hw in SIZES[1:]]


@pytest.mark.parametrize('hw,training', CASES)
def test_reference(hw, training):
    m = _with_act_name(visattn.create_attn('mobilevit', 16, transformer_dim=24))
    _check_against_reference(m, lambda x, m: ref_mobilevit(x, m, training), torch.randn(2, 16, *hw), training)


@pytest.mark.parametrize('kwargs', [
    dict(patch_size=3), dict(patch_size=1), dict(kernel_size=5, transformer_depth=3, num_heads=2),
    dict(out_channels=24, mlp_ratio=1.5), dict(no_fusion=True, out_channels=8), dict(act_layer='relu'),
])
def test_options_reference(kwargs):
    m = _with_act_name(visattn.create_attn('mobilevit', 16, **kwargs))
    _check_against_reference(m, ref_mobilevit, torch.randn(2, 16, 7, 10))


def _timm_block(channels, act=torch.nn.SiLU, **kwargs):
    """timm's block as its MobileViT models build it (conv-BN-act with the model's activation, SiLU there)."""
    layers = LayerFn(conv_norm_act=functools.partial(ConvNormAct, act_layer=act), act=act)
    return TimmMobileVitBlock(channels, layers=layers, **kwargs)


@pytest.mark.parametrize('hw,training', CASES)
def test_matches_timm(hw, training):
    torch.manual_seed(0)
    theirs = _randomize(_timm_block(16, transformer_dim=24, patch_size=2))
    ours = MobileVitBlock(16, transformer_dim=24)
    assert_same_function(ours, theirs, torch.randn(2, 16, *hw), training, out_tol=1e-12, grad_tol=1e-10)


@pytest.mark.parametrize('ours_kw,timm_kw', [
    (dict(patch_size=8), dict(patch_size=8)),  # timm's default patch, on a 13×17 map
    (dict(act_layer=torch.nn.ReLU, patch_size=8), dict(act=torch.nn.ReLU)),  # timm's standalone default
    (dict(out_channels=24, num_heads=2, transformer_depth=3, kernel_size=5),
     dict(out_chs=24, num_heads=2, transformer_depth=3, kernel_size=5, patch_size=2)),
    (dict(no_fusion=True), dict(no_fusion=True, patch_size=2)),
])
def test_matches_timm_options(ours_kw, timm_kw):
    torch.manual_seed(0)
    theirs = _randomize(_timm_block(16, **timm_kw))
    ours = MobileVitBlock(16, **ours_kw)
    assert_same_function(ours, theirs, torch.randn(2, 16, 13, 17), out_tol=1e-12, grad_tol=1e-10)


def test_attention_is_sdpa(monkeypatch):
    """Each transformer layer's attention is one ``scaled_dot_product_attention`` call over the B·p² sequences."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(q, k, v, *args, **kwargs):
        calls.append(q.shape)
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, 'scaled_dot_product_attention', counting)
    m = MobileVitBlock(16, transformer_depth=3, num_heads=2).eval()
    m(torch.randn(2, 16, 7, 9))
    assert calls == [(2 * 4, 2, 4 * 5, 8)] * 3  # [B·p², heads, patches, head width]


def test_defaults():
    m = MobileVitBlock(32)
    assert m.patch_size == 2 and len(m.transformer) == 2 and m.transformer[0].attn.num_heads == 4
    assert m.transformer_dim == 32 and m.transformer[0].mlp.fc1.out_features == 64
    assert isinstance(m.conv_kxk.bn.act, torch.nn.SiLU) and m.transformer[0].attn.qkv.bias is not None


def test_autocast_bf16():
    torch.manual_seed(0)
    m = _randomize(visattn.create_attn('mobilevit', 32)).train()
    x = torch.randn(3, 32, 7, 9, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = m(x)
    want = m(x)
    assert (y.float() - want).norm() <= 0.02 * want.norm()
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    mb = visattn.create_attn('mobilevit', 32, dtype=torch.bfloat16).eval()
    assert mb(x.detach().bfloat16()).dtype == torch.bfloat16


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
@pytest.mark.parametrize('no_fusion', [False, True])
def test_scripts(no_fusion):
    m = _randomize(visattn.create_attn('mobilevit', 16, no_fusion=no_fusion, dtype=torch.float64)).eval()
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(torch.jit.script(m)(x), m(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('kwargs,arg', [
    (dict(num_heads=3), 'num_heads'), (dict(transformer_dim=10, num_heads=4), 'num_heads'),
    (dict(kernel_size=2), 'kernel_size'), (dict(patch_size=0), 'patch_size'), (dict(mlp_ratio=0.01), 'mlp_ratio'),
    (dict(transformer_dim=0), 'transformer_dim'), (dict(drop_path=2.), 'drop_path'),
])
def test_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        visattn.create_attn('mobilevit', 16, **kwargs)


def test_bad_input():
    with pytest.raises(ValueError, match='MobileVitBlock'):
        visattn.create_attn('mobilevit', 16)(torch.randn(2, 15, 5, 5))
