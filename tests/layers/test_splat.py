"""ResNeSt split attention (``splat``): a float64 reference written from the paper's equations (output and every
gradient, odd sizes incl. 1×1, eval and train, radix 1 / 2 / 4, cardinality, stride, dilation), timm's ``SplitAttn``
with the same weights (alone and inside timm's ResNeSt-50), widths, options and errors."""

import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers.helpers import make_divisible as timm_make_divisible
from timm.layers.split_attn import SplitAttn as TimmSplitAttn

import visattn
from visattn.layers.splat import splat_rd_channels

sys.path.insert(0, str(Path(__file__).parent))
from test_coord import check_matches_timm  # noqa: E402
from test_gating_blocks import _bn, _check_against_reference, _randomize  # noqa: E402

SIZES = [(7, 9), (13, 17), (1, 1)]


def grouped_fc(v, weight, bias, groups):
    """A grouped 1×1 conv on vectors: v [B, n_in], weight [n_out, n_in / groups, 1, 1] -> [B, n_out]."""
    B, n_in = v.shape
    n_out = weight.shape[0]
    w = weight.reshape(groups, n_out // groups, n_in // groups)
    return torch.einsum('bki,koi->bko', v.reshape(B, groups, n_in // groups), w).reshape(B, n_out) + bias


def ref_splat(x, m, training=False):
    """U = ReLU(BN(grouped conv(x))) split into R maps U_r; s = GAP(Σ_r U_r); z = ReLU(BN(W_1 s + b_1));
    logits = W_2 z + b_2, where the logit of split r, channel c in cardinal group k = c // (C/K) sits at
    k·R·(C/K) + r·(C/K) + c mod (C/K); a = softmax over r (sigmoid for R = 1); V = Σ_r a_r · U_r."""
    p = dict(m.named_parameters())
    R, K, C = m.radix, m.groups, m.out_channels
    conv = m.conv
    u = F.conv2d(x, p['conv.weight'], p.get('conv.bias'), stride=conv.stride,
                 padding=conv.dilation[0] * (conv.kernel_size[0] - 1) // 2, dilation=conv.dilation, groups=K * R)
    if 'bn0.weight' in p:
        u = _bn(u, m, 'bn0', training)
    splits = torch.relu(u).split(C, dim=1)
    s = sum(splits).mean((2, 3))  # [B, C]
    z = grouped_fc(s, p['fc1.weight'], p['fc1.bias'], K)
    if 'bn1.weight' in p:
        z = _bn(z, m, 'bn1', training)
    logits = grouped_fc(torch.relu(z), p['fc2.weight'], p['fc2.bias'], K)  # [B, R·C]
    cg = C // K
    idx = torch.tensor([[(c // cg) * R * cg + r * cg + c % cg for c in range(C)] for r in range(R)])
    a = logits[:, idx]  # [B, R, C]
    a = torch.softmax(a, dim=1) if R > 1 else torch.sigmoid(a)
    return sum(a[:, r, :, None, None] * splits[r] for r in range(R))


@pytest.mark.parametrize('hw', SIZES)
@pytest.mark.parametrize('training', [False, True])
def test_reference(hw, training):
    m = visattn.create_attn('splat', 32)
    _check_against_reference(m, lambda x, m: ref_splat(x, m, training), torch.randn(3, 32, *hw), training)


@pytest.mark.parametrize('kwargs', [
    dict(radix=1),
    dict(radix=4),
    dict(radix=2, groups=2),
    dict(radix=4, groups=4),
    dict(stride=2),
    dict(stride=2, out_channels=48, radix=1),
    dict(dilation=2, kernel_size=5),
    dict(norm_layer=None, bias=True),
    dict(rd_channels=12, groups=4),
])
@pytest.mark.parametrize('training', [False, True])
def test_options_reference(kwargs, training):
    m = visattn.create_attn('splat', 32, **kwargs)
    _check_against_reference(m, lambda x, m: ref_splat(x, m, training), torch.randn(3, 32, 7, 9), training)


@pytest.mark.parametrize('stride, hw, out_hw', [(2, (7, 9), (4, 5)), (2, (1, 1), (1, 1)), (3, (13, 17), (5, 6))])
def test_stride_and_out_channels(stride, hw, out_hw):
    m = visattn.create_attn('splat', 32, out_channels=16, stride=stride).eval()
    assert m(torch.randn(2, 32, *hw)).shape == (2, 16, *out_hw)


def test_dilation_keeps_the_size():
    m = visattn.create_attn('splat', 32, dilation=3).eval()
    assert m.conv.padding == (3, 3)
    assert m(torch.randn(2, 32, 7, 9)).shape == (2, 32, 7, 9)


# ----- against timm, same weights -----

@pytest.mark.parametrize('theirs_kw, ours_kw', [
    (dict(norm_layer=torch.nn.BatchNorm2d), {}),  # the paper's (and ResNeSt's) BN, which timm leaves to its caller
    ({}, dict(norm_layer=None)),  # timm's default: no norm
    (dict(radix=1, norm_layer=torch.nn.BatchNorm2d), dict(radix=1)),
    (dict(radix=4, groups=2, norm_layer=torch.nn.BatchNorm2d), dict(radix=4, groups=2)),
    (dict(out_channels=48, stride=2, norm_layer=torch.nn.BatchNorm2d), dict(out_channels=48, stride=2)),
    (dict(dilation=2, padding=2, norm_layer=torch.nn.BatchNorm2d), dict(dilation=2)),  # timm's ResNeSt padding
    (dict(kernel_size=5, rd_channels=16, groups=2, bias=True), dict(kernel_size=5, rd_channels=16, groups=2,
                                                                    bias=True, norm_layer=None)),
])
@pytest.mark.parametrize('training', [False, True])
def test_matches_timm(theirs_kw, ours_kw, training):
    ours = visattn.create_attn('splat', 64, **ours_kw)
    check_matches_timm(ours, TimmSplitAttn(64, **theirs_kw), torch.randn(3, 64, 7, 9), training)


def test_resnest_runs_on_ours():
    """timm's ResNeSt-14 (ResNeSt-50's bottleneck, one per stage) with every SplitAttn swapped for ours, loading its
    own state dict, computes the same logits."""
    torch.manual_seed(0)
    theirs = timm.create_model('resnest14d', num_classes=10).eval()
    ours = timm.create_model('resnest14d', num_classes=10).eval()
    swapped = 0
    for name, mod in list(ours.named_modules()):
        if isinstance(mod, TimmSplitAttn):
            parent = ours.get_submodule(name.rsplit('.', 1)[0])
            c = mod.conv
            setattr(parent, name.rsplit('.', 1)[1], visattn.create_attn(
                'splat', c.in_channels, out_channels=c.out_channels // mod.radix, stride=c.stride[0],
                dilation=c.dilation[0], groups=c.groups // mod.radix, radix=mod.radix).eval())
            swapped += 1
    assert swapped == 4
    ours.load_state_dict(theirs.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)


def test_width_is_timms():
    """fc1's width: max(32, C_in·R/4) rounded to a multiple of 8 (at most 10% down), as timm (the released code
    floors C_in·R/4: the same for the widths of ResNeSt, 64 ... 512)."""
    for c in range(8, 400, 3):
        for radix in (1, 2, 4):
            want = timm_make_divisible(c * radix * 0.25, min_value=32, divisor=8)  # timm's SplitAttn width
            assert splat_rd_channels(c, radix, 0.25, 8) == want, (c, radix)
    for c, radix in [(64, 2), (96, 4), (143, 1), (200, 2)]:
        want = TimmSplitAttn(c, radix=radix).fc1.out_channels
        assert visattn.create_attn('splat', c, radix=radix).rd_channels == want
    assert splat_rd_channels(143, 1, 0.25, 8) == 40 and timm_make_divisible(143 * 0.25, 8, 32) == 40  # the 10% rule
    for c in (64, 128, 256, 512):
        assert splat_rd_channels(c, 2, 0.25, 8) == max(c * 2 // 4, 32)
    assert visattn.create_attn('splat', 64, rd_channels=16, radix=4).fc1.out_channels == 64  # per split, as timm


def test_pooled_norm_needs_two_images_only_with_a_norm():
    x = torch.randn(1, 32, 7, 9)
    with pytest.raises(ValueError, match='batch of at least 2'):
        visattn.create_attn('splat', 32).train()(x)
    assert visattn.create_attn('splat', 32, norm_layer=None).train()(x).shape == x.shape


@pytest.mark.parametrize('kwargs, arg', [
    (dict(radix=3), 'radix'),  # 3 does not divide 32
    (dict(groups=3), 'groups'),
    (dict(groups=16, radix=2, out_channels=24), 'groups'),
    (dict(kernel_size=4), 'kernel_size'),
    (dict(rd_ratio=0.), 'rd_ratio'),
    (dict(rd_channels=0), 'rd_channels'),
])
def test_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        visattn.create_attn('splat', 32, **kwargs)


def test_radix_softmax_layout_is_cardinal_major():
    """With K = 2 and R = 2, fc2's outputs are laid out [k0: r0, r1 | k1: r0, r1] (C/K each): raising the block of
    cardinal group 0, split 1 moves the weight of channels 0 … C/K - 1 to split 1, and leaves group 1 at 1/2."""
    m = visattn.create_attn('splat', 16, groups=2, radix=2, norm_layer=None).eval()
    with torch.no_grad():
        for p in (m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias):
            p.zero_()
        m.fc2.bias[8:16] = 10.  # k = 0, r = 1, channels 0..7 (C = 16, C/K = 8)
        x = torch.randn(2, 16, 3, 5)
        u0, u1 = torch.relu(m.conv(x)).split(16, dim=1)
        y = m(x)
    a1 = torch.full((16, 1, 1), 0.5)
    a1[:8] = torch.sigmoid(torch.tensor(10.))
    torch.testing.assert_close(y, (1 - a1) * u0 + a1 * u1)


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
@pytest.mark.parametrize('kwargs', [{}, dict(radix=1), dict(radix=4, groups=2, stride=2)])
def test_scripts(kwargs):
    m = _randomize(visattn.create_attn('splat', 32, **kwargs)).eval()
    scripted = torch.jit.script(m)
    x = torch.randn(2, 32, 5, 7)
    torch.testing.assert_close(scripted(x), m(x))
