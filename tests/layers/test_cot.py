"""Contextual Transformer (``cot``): a float64 reference written from the paper's equations and the released
``CotLayer`` (output and every gradient, odd sizes incl. 1×1, eval and train, stride 2, other options), the local
aggregation's hand-written backward, receptive fields, CoTNet-50's size, bf16 and bad arguments."""

import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import visattn
from visattn.layers.cot import ContextualTransformer, _aggregate, cot_aggregate

sys.path.insert(0, str(Path(__file__).parent))
from test_gating_blocks import _bn, _check_against_reference, _randomize  # noqa: E402

SIZES = [(7, 9), (13, 17), (1, 1)]


def _pw(x, weight, bias=None):
    """A 1×1 conv written out: x [B, I, H, W], weight [O, I, 1, 1] -> [B, O, H, W]."""
    y = torch.einsum('oi,bihw->bohw', weight.flatten(1), x)
    return y if bias is None else y + bias[:, None, None]


def _group_norm(x, groups, weight, bias, eps=1e-5):
    B, C, H, W = x.shape
    g = x.reshape(B, groups, -1)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + eps)
    return g.reshape(B, C, H, W) * weight[:, None, None] + bias[:, None, None]


def _avg_pool_3x3_s2(x):
    """The released Bottleneck's ``avd``: 3×3 windows, stride 2, zero padding 1, always divided by 9."""
    H, W = x.shape[-2:]
    xp = F.pad(x, (1, 1, 1, 1))
    Ho, Wo = (H - 1) // 2 + 1, (W - 1) // 2 + 1
    return sum(xp[..., a:a + 2 * Ho - 1:2, b:b + 2 * Wo - 1:2] for a in range(3) for b in range(3)) / 9


def ref_aggregate(v, w, k, share_planes):
    """Σ_t w[c mod C/S, t] · unfold(v)[c, t] with the zero-padded unfold of the k×k windows."""
    B, C, H, W = v.shape
    Cw = C // share_planes
    vu = F.unfold(v, k, padding=k // 2).view(B, C, k * k, H * W)
    idx = torch.tensor([[(c % Cw) * k * k + t for t in range(k * k)] for c in range(C)])  # [C, k²]
    wc = w.flatten(2)[:, idx]  # [B, C, k², HW]: the weights channel c uses
    return (wc * vu).sum(2).view(B, C, H, W)


def ref_cot(x, m, training=False):
    """K¹ = ReLU(BN(grouped k×k conv x)); A = GN(W_θ ReLU(BN(W_δ [x, K¹])) + b_θ); V = BN(W_v x);
    K² = SiLU(BN(Σ_t A · V)); a = softmax_r(W_2 ReLU(BN(W_1 GAP(K¹ + K²) + b_1)) + b_2) (logit of channel c, split r
    at 2c + r); y = a_0 K² + a_1 K¹."""
    p = dict(m.named_parameters())
    k, S, C = m.kernel_size, m.share_planes, m.channels
    if m.stride == 2:
        x = _avg_pool_3x3_s2(x)
    groups = m.key_embed[0].groups
    key = torch.relu(_bn(F.conv2d(x, p['key_embed.0.weight'], padding=k // 2, groups=groups), m, 'key_embed.1',
                         training))
    a = torch.relu(_bn(_pw(torch.cat([x, key], 1), p['embed.0.weight']), m, 'embed.1', training))
    a = _pw(a, p['embed.3.weight'], p['embed.3.bias'])
    a = _group_norm(a, C // S, p['embed.4.weight'], p['embed.4.bias'])
    v = _bn(_pw(x, p['conv1x1.0.weight']), m, 'conv1x1.1', training)
    y = _bn(ref_aggregate(v, a, k, S), m, 'bn', training)
    y = y * torch.sigmoid(y) if isinstance(m.act, torch.nn.SiLU) else torch.relu(y)
    s = (y + key).mean((2, 3), keepdim=True)
    z = torch.relu(_bn(_pw(s, p['se.0.weight'], p['se.0.bias']), m, 'se.1', training))
    logits = _pw(z, p['se.3.weight'], p['se.3.bias']).flatten(1)  # [B, 2C]
    w = torch.softmax(torch.stack([logits[:, 0::2], logits[:, 1::2]], 1), dim=1)[..., None, None]  # [B, 2, C, 1, 1]
    return w[:, 0] * y + w[:, 1] * key


@pytest.mark.parametrize('hw', SIZES)
@pytest.mark.parametrize('training', [False, True])
def test_reference(hw, training):
    m = visattn.create_attn('cot', 32)
    _check_against_reference(m, lambda x, m: ref_cot(x, m, training), torch.randn(2, 32, *hw), training)


@pytest.mark.parametrize('kwargs', [
    dict(stride=2), dict(kernel_size=5), dict(kernel_size=1), dict(share_planes=4, key_groups=2),
    dict(share_planes=1, embed_factor=4), dict(reduction_factor=2, min_attn_channels=8), dict(act_layer='relu'),
])
def test_options_reference(kwargs):
    m = visattn.create_attn('cot', 32, **kwargs)
    _check_against_reference(m, ref_cot, torch.randn(2, 32, 7, 9))


def test_stride_two_sizes():
    m = visattn.create_attn('cot', 16, stride=2).eval()
    for hw, want in (((7, 9), (4, 5)), ((8, 8), (4, 4)), ((1, 1), (1, 1))):
        assert m(torch.randn(2, 16, *hw)).shape == (2, 16, *want)


def test_released_widths_and_names():
    """The released CotLayer(64): key convolution in 4 groups, attention embedding 128 -> 32 -> 9·8 (GroupNorm of 8
    groups), fusion width max(64·2/4, 32) = 32; the parameter names are the released code's."""
    m = ContextualTransformer(64)
    assert m.key_embed[0].weight.shape == (64, 16, 3, 3)
    assert m.embed[0].weight.shape == (32, 128, 1, 1) and m.embed[3].weight.shape == (72, 32, 1, 1)
    assert m.embed[4].num_groups == 8 and m.se[0].out_channels == 32 and m.se[3].out_channels == 128
    assert ContextualTransformer(256).attn_channels == 128
    names = {n for n, _ in m.named_parameters()}
    assert {'key_embed.0.weight', 'embed.3.bias', 'embed.4.weight', 'conv1x1.0.weight', 'bn.weight',
            'se.3.bias'} <= names


def test_cotnet50_parameter_count():
    """CoTNet-50 = ResNet-50 with every bottleneck's 3×3 conv (and its BN) replaced by a CoT block: 22.2M parameters,
    the paper's table (ResNet-50: 25.6M)."""
    model = timm.create_model('resnet50', pretrained=False)
    total = sum(p.numel() for p in model.parameters())
    for blk in model.modules():
        if isinstance(blk, timm.models.resnet.Bottleneck):
            total -= sum(p.numel() for p in [*blk.conv2.parameters(), *blk.bn2.parameters()])
            total += sum(p.numel() for p in ContextualTransformer(blk.conv2.in_channels, device='meta').parameters())
    assert round(total / 1e6, 1) == 22.2


# ----- the local aggregation -----

@pytest.mark.parametrize('needs', [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize('k,S', [(3, 2), (5, 1), (1, 4)])
def test_aggregate_backward(needs, k, S):
    v = torch.randn(2, 8, 5, 7, dtype=torch.float64, requires_grad=needs[0])
    w = torch.randn(2, 8 // S * k * k, 5, 7, dtype=torch.float64, requires_grad=needs[1])
    y = cot_aggregate(v, w, k, S)
    assert y.grad_fn is not None and 'Aggregate' in type(y.grad_fn).__name__
    torch.testing.assert_close(y, ref_aggregate(v, w, k, S), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_aggregate(v, w, k, S), y, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: cot_aggregate(a, b, k, S), (v, w), fast_mode=True)


def test_aggregate_receptive_field():
    """Perturbing v at one pixel moves y only within the k×k window around it; perturbing w only at that pixel."""
    k, r = 3, 1
    v, w = torch.randn(1, 8, 9, 11), torch.randn(1, 4 * k * k, 9, 11)
    y = cot_aggregate(v, w, k, 2)
    i, j = 4, 0
    dv, dw = v.clone(), w.clone()
    dv[..., i, j] += 1
    dw[..., i, j] += 1
    rows, cols = torch.arange(9)[:, None], torch.arange(11)[None, :]
    near = ((rows - i).abs() <= r) & ((cols - j).abs() <= r)
    moved = (cot_aggregate(dv, w, k, 2) - y).abs().amax((0, 1)) > 0
    assert torch.equal(moved, near)
    moved = (cot_aggregate(v, dw, k, 2) - y).abs().amax((0, 1)) > 0
    at = torch.zeros(9, 11, dtype=torch.bool)
    at[i, j] = True
    assert torch.equal(moved, at)


def test_block_receptive_field():
    """The static context K¹ and the attention embedding before its GroupNorm see only the k×k window around each
    pixel. Two statistics are global: the GroupNorm of the attention (over the whole map, per group, as released) and
    the fusion's average pool; past them the fusion is per pixel: y = a_0 K² + a_1 K¹ with per-channel a."""
    torch.manual_seed(0)
    m = _randomize(ContextualTransformer(16)).double().eval()
    seen = {}
    for name, mod in (('k1', m.key_embed), ('pre_gn', m.embed[3]), ('k2', m.act), ('logits', m.se)):
        mod.register_forward_hook(lambda mod, i, o, name=name: seen.__setitem__(name, o.clone()))
    x = torch.randn(2, 16, 9, 10, dtype=torch.float64)
    m(x)
    before = dict(seen)
    i, j = 3, 7
    x2 = x.clone()
    x2[:, :, i, j] += 3
    out2 = m(x2)
    rows, cols = torch.arange(9)[:, None], torch.arange(10)[None, :]
    near = ((rows - i).abs() <= 1) & ((cols - j).abs() <= 1)
    for name in ('k1', 'pre_gn'):
        assert torch.equal((seen[name] - before[name]).abs().amax((0, 1)) > 0, near), name
    assert not torch.allclose(seen['k2'][..., ~near], before['k2'][..., ~near])  # through the GroupNorm statistics
    a = torch.softmax(seen['logits'].view(2, 16, 2), dim=2)[..., None, None]
    torch.testing.assert_close(out2, a[:, :, 0] * seen['k2'] + a[:, :, 1] * seen['k1'], rtol=1e-12, atol=1e-12)


# ----- dtypes, scripting, errors -----

def test_autocast_bf16():
    torch.manual_seed(0)
    m = _randomize(visattn.create_attn('cot', 32)).train()
    x = torch.randn(3, 32, 7, 9, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = m(x)
    want = m(x)
    assert (y.float() - want).norm() <= 0.02 * want.norm()
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    mb = visattn.create_attn('cot', 32, dtype=torch.bfloat16).eval()
    assert mb(x.detach().bfloat16()).dtype == torch.bfloat16


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
def test_scripts():
    m = _randomize(visattn.create_attn('cot', 32, dtype=torch.float64)).eval()
    x = torch.randn(2, 32, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(torch.jit.script(m)(x), m(x), rtol=1e-12, atol=1e-12)


def test_train_batch_of_one_is_refused():
    m = visattn.create_attn('cot', 16).train()
    with pytest.raises(ValueError, match='batch of at least 2'):
        m(torch.randn(1, 16, 5, 5))
    m.eval()(torch.randn(1, 16, 5, 5))


@pytest.mark.parametrize('kwargs,arg', [
    (dict(kernel_size=4), 'kernel_size'),
    (dict(stride=3), 'stride'),
    (dict(key_groups=3), 'key_groups'),
    (dict(share_planes=5), 'share_planes'),
    (dict(embed_factor=64), 'embed_factor'),
    (dict(min_attn_channels=0), 'min_attn_channels'),
])
def test_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        visattn.create_attn('cot', 32, **kwargs)


def test_bad_input():
    m = visattn.create_attn('cot', 16)
    with pytest.raises(ValueError, match='ContextualTransformer'):
        m(torch.randn(2, 8, 5, 5))
