"""Efficient Local Attention (``ela``): a float64 reference written from the paper's equations (output and every
gradient, odd sizes, eval and train, the four versions), timm's module with the same weights, options and errors."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.layers.coord_attn import EfficientLocalAttn as TimmEfficientLocalAttn

import visattn
from visattn.layers.ela import ELA_VARIANTS

sys.path.insert(0, str(Path(__file__).parent))
from test_coord import check_matches_timm  # noqa: E402
from test_gating_blocks import _check_against_reference, _randomize  # noqa: E402

SIZES = [(7, 9), (13, 17), (1, 1)]


def conv1d(z, w, groups):
    """Zero-padded grouped 1-D convolution along the last axis: z [B, C, L], w [C, C/groups, k] -> [B, C, L]."""
    B, C, L = z.shape
    k = w.shape[-1]
    windows = F.pad(z, (k // 2, k // 2)).unfold(2, k, 1)  # [B, C, L, k]
    windows = windows.reshape(B, groups, C // groups, L, k)
    out = torch.einsum('bgilt,goit->bgol', windows, w.reshape(groups, C // groups, C // groups, k))
    return out.reshape(B, C, L)


def group_norm(z, weight, bias, groups):
    """Group norm of z [B, C, L]: statistics over each group's (C / groups) · L values."""
    B, C, L = z.shape
    g = z.reshape(B, groups, -1)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-5)
    return g.reshape(B, C, L) * weight[:, None] + bias[:, None]


def ref_ela(x, m, act=None):
    """y^h = σ(G_n(F(z^h))), y^w = σ(G_n(F(z^w))), Y = x · y^h · y^w; one F and one G_n for both strips unless the
    module has separate ones (then F_h / F_w and their norms)."""
    act = act or (lambda t: t)
    params = dict(m.named_parameters())
    groups, ng = m.groups, m.norm_groups

    def encode(z, conv, norm):
        w = params[conv + '.weight'].reshape(z.shape[1], -1, m.kernel_size)
        y = group_norm(conv1d(z, w, groups), params[norm + '.weight'], params[norm + '.bias'], ng)
        return torch.sigmoid(act(y))

    if m.shared:
        y_h, y_w = encode(x.mean(3), 'conv', 'norm'), encode(x.mean(2), 'conv', 'norm')
    else:
        y_h, y_w = encode(x.mean(3), 'conv_h', 'norm_h'), encode(x.mean(2), 'conv_w', 'norm_w')
    return x * y_h[:, :, :, None] * y_w[:, :, None, :]


@pytest.mark.parametrize('hw', SIZES)
@pytest.mark.parametrize('training', [False, True])
def test_reference(hw, training):
    m = visattn.create_attn('ela', 64)
    _check_against_reference(m, ref_ela, torch.randn(3, 64, *hw), training)


@pytest.mark.parametrize('variant', sorted(ELA_VARIANTS))
def test_variants(variant):
    """The paper's four versions: kernel size, groups of the convolution, groups of the group norm."""
    k, per_group, ng = {'T': (5, 1, 32), 'B': (7, 1, 16), 'S': (5, 8, 16), 'L': (7, 8, 16)}[variant]
    m = visattn.create_attn('ela', 64, variant=variant)
    assert (m.kernel_size, m.groups, m.norm_groups) == (k, 64 // per_group, ng)
    assert m.conv.weight.shape == (64, per_group, k) and m.norm.num_groups == ng
    assert sum(p.numel() for p in m.parameters()) == 64 * per_group * k + 2 * 64
    _check_against_reference(m, ref_ela, torch.randn(2, 64, 7, 9))


def test_default_is_ela_b():
    m = visattn.create_attn('ela', 128)
    assert (m.kernel_size, m.groups, m.norm_groups, m.shared) == (7, 128, 16, True)
    assert m.conv.bias is None and isinstance(m.act, torch.nn.Identity)


def test_separate_strips_and_activation():
    m = visattn.create_attn('ela', 32, shared=False, kernel_size=3, groups=4, norm_groups=8, act_layer=torch.nn.SiLU)
    assert m.conv_h.weight.shape == (32, 8, 3, 1) and m.conv_w.weight.shape == (32, 8, 1, 3)
    assert not any(n.startswith(('conv.', 'norm.')) for n, _ in m.named_parameters())
    _check_against_reference(m, lambda x, m: ref_ela(x, m, lambda t: t * torch.sigmoid(t)), torch.randn(2, 32, 13, 17),
                             training=True)


def test_shared_and_separate_differ_only_by_weights():
    """With the shared weights copied into both strips, the separate form computes the shared one."""
    shared = _randomize(visattn.create_attn('ela', 32, norm_groups=4)).eval()
    separate = visattn.create_attn('ela', 32, norm_groups=4, shared=False).eval()
    w = shared.conv.weight
    separate.load_state_dict({
        'conv_h.weight': w[..., None], 'conv_w.weight': w[:, :, None, :],
        'norm_h.weight': shared.norm.weight, 'norm_h.bias': shared.norm.bias,
        'norm_w.weight': shared.norm.weight, 'norm_w.bias': shared.norm.bias})
    x = torch.randn(2, 32, 7, 9)
    torch.testing.assert_close(separate(x), shared(x))


@pytest.mark.parametrize('training', [False, True])
def test_matches_timm(training):
    """timm: separate strips, group norm with one group, SiLU before the gate."""
    ours = visattn.create_attn('ela', 48, shared=False, groups=48, norm_groups=1, act_layer=torch.nn.SiLU)
    check_matches_timm(ours, TimmEfficientLocalAttn(48), torch.randn(3, 48, 7, 9), training)


def test_matches_timm_kernel_5():
    ours = visattn.create_attn('ela', 32, variant='T', shared=False, norm_groups=1, act_layer='silu')
    check_matches_timm(ours, TimmEfficientLocalAttn(32, kernel_size=5), torch.randn(2, 32, 13, 17))


def test_paper_default_differs_from_timm():
    """The paper's ELA-B (shared, 16 groups, no SiLU) is another function than timm's defaults."""
    theirs = _randomize(TimmEfficientLocalAttn(64)).eval()
    ours = visattn.create_attn('ela', 64).eval()
    with torch.no_grad():
        ours.conv.weight.copy_(theirs.conv_h.weight.flatten(2))
        ours.norm.weight.copy_(theirs.norm_h.weight)
        ours.norm.bias.copy_(theirs.norm_h.bias)
    x = torch.randn(2, 64, 7, 9)
    assert not torch.allclose(ours(x), theirs(x), atol=1e-3)


@pytest.mark.parametrize('kwargs, arg', [
    (dict(variant='X'), 'variant'),
    (dict(kernel_size=4), 'kernel_size'),
    (dict(kernel_size=0), 'kernel_size'),
    (dict(groups=3), 'groups'),
    (dict(groups=0), 'groups'),
    (dict(norm_groups=5), 'norm_groups'),
    (dict(norm_groups=-1), 'norm_groups'),
])
def test_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        visattn.create_attn('ela', 64, **kwargs)


@pytest.mark.parametrize('arg', ['kernel_size', 'groups', 'norm_groups'])
def test_non_integer_arguments(arg):
    with pytest.raises(TypeError, match=f"{arg} must be an int, got str 'x'"):
        visattn.create_attn('ela', 64, **{arg: 'x'})


def test_variant_needs_divisible_channels():
    with pytest.raises(ValueError, match='multiple of 8'):
        visattn.create_attn('ela', 36, variant='S', norm_groups=4)
    assert visattn.create_attn('ela', 36, variant='S', groups=4, norm_groups=4).groups == 4


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
@pytest.mark.parametrize('shared', [True, False])
def test_scripts(shared):
    m = _randomize(visattn.create_attn('ela', 32, shared=shared, norm_groups=8)).eval()
    scripted = torch.jit.script(m)
    x = torch.randn(2, 32, 5, 7)
    torch.testing.assert_close(scripted(x), m(x))



@pytest.mark.parametrize('shared', [True, False])
def test_autocast_bf16(shared):
    m = _randomize(visattn.create_attn('ela', 32, norm_groups=8, shared=shared)).train()
    x = torch.randn(3, 32, 7, 9, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = m(x)
    (gx,) = torch.autograd.grad(y.float().square().sum(), x)
    x32 = x.detach().requires_grad_()
    y32 = m(x32)
    (gx32,) = torch.autograd.grad(y32.square().sum(), x32)
    torch.testing.assert_close(y.float(), y32, rtol=0.05, atol=0.05)
    torch.testing.assert_close(gx, gx32, rtol=0.1, atol=0.1)
