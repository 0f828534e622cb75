"""Strip pooling attention (``strip``): a float64 reference of the paper's SPM as its released code builds it (output
and every gradient, odd sizes, eval and train), timm's minimal ``StripAttn`` with the same weights, options, errors."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.layers.coord_attn import StripAttn as TimmStripAttn

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from test_coord import check_matches_timm  # noqa: E402
from test_ela import conv1d  # noqa: E402
from test_gating_blocks import _bn, _check_against_reference, _randomize  # noqa: E402

SIZES = [(7, 9), (13, 17), (1, 1)]


def ref_spm(x, m, training=False):
    """y^h = BN_h(K_h ∗ AvgPool_W(x)), y^w = BN_w(K_w ∗ AvgPool_H(x)) (1-D kernels along each strip),
    z = x · σ(W_f ReLU(y^h + y^w) + b_f); with the module's options, the parts it leaves out are skipped."""
    params = dict(m.named_parameters())
    C = x.shape[1]

    def strip(z, name):  # z: [B, C, L] -> [B, C, L]
        if m.use_conv:
            z = conv1d(z, params[f'conv_{name}.weight'].reshape(C, C // m.groups, m.kernel_size), m.groups)
            if f'conv_{name}.bias' in params:
                z = z + params[f'conv_{name}.bias'][:, None]
        if f'norm_{name}.weight' in params:
            z = _bn(z, m, f'norm_{name}', training)
        return z

    y = strip(x.mean(3), 'h')[:, :, :, None] + strip(x.mean(2), 'w')[:, :, None, :]  # [B, C, H, W]
    if m.fuse:
        y = torch.einsum('oc,bchw->bohw', params['conv_fuse.weight'].flatten(1), torch.relu(y))
        y = y + params['conv_fuse.bias'][:, None, None]
    return x * torch.sigmoid(y)


@pytest.mark.parametrize('hw', SIZES)
@pytest.mark.parametrize('training', [False, True])
def test_reference(hw, training):
    m = visattn.create_attn('strip', 32)
    _check_against_reference(m, lambda x, m: ref_spm(x, m, training), torch.randn(3, 32, *hw), training)


def test_defaults_are_the_released_spm():
    m = visattn.create_attn('strip', 64)
    assert m.conv_h.weight.shape == (64, 64, 3, 1) and m.conv_w.weight.shape == (64, 64, 1, 3)
    assert m.conv_h.bias is None and isinstance(m.norm_h, torch.nn.BatchNorm2d)
    assert m.conv_fuse.weight.shape == (64, 64, 1, 1) and m.conv_fuse.bias is not None
    # SPNet's SPBlock(64, 64): two strip convs 2·64·64·3, two BNs 4·64, the 1×1 fusion 64·64 + 64
    assert sum(p.numel() for p in m.parameters()) == 2 * 64 * 64 * 3 + 4 * 64 + 64 * 64 + 64


@pytest.mark.parametrize('kwargs', [
    dict(kernel_size=5, groups=4, bias=True),
    dict(norm_layer=None),
    dict(fuse=False),
    dict(use_conv=False),
])
def test_options_reference(kwargs):
    m = visattn.create_attn('strip', 32, **kwargs)
    _check_against_reference(m, lambda x, m: ref_spm(x, m, True), torch.randn(3, 32, 7, 9), training=True)


@pytest.mark.parametrize('use_conv', [True, False])
@pytest.mark.parametrize('kernel_size', [3, 7])
def test_matches_timm(use_conv, kernel_size):
    """timm's StripAttn is the SPM without its norms and fusion, with depthwise strip convolutions."""
    ours = visattn.create_attn('strip', 32, kernel_size=kernel_size, groups=32, norm_layer=None, fuse=False,
                               use_conv=use_conv)
    theirs = TimmStripAttn(32, kernel_size=kernel_size, use_conv=use_conv)
    check_matches_timm(ours, theirs, torch.randn(2, 32, 7, 9))


def test_spm_differs_from_timm():
    theirs = _randomize(TimmStripAttn(32)).eval()
    ours = _randomize(visattn.create_attn('strip', 32, groups=32)).eval()
    with torch.no_grad():
        ours.conv_h.weight.copy_(theirs.conv_h.weight)
        ours.conv_w.weight.copy_(theirs.conv_w.weight)
    x = torch.randn(2, 32, 7, 9)
    assert not torch.allclose(ours(x), theirs(x), atol=1e-3)


def test_single_training_pixel_is_refused_by_batch_norm():
    m = visattn.create_attn('strip', 16).train()
    with pytest.raises(ValueError, match='more than 1 value'):
        m(torch.randn(1, 16, 1, 1))
    with pytest.raises(ValueError, match='more than 1 value'):
        m(torch.randn(1, 16, 1, 5))  # the row strip has one value per channel
    assert m(torch.randn(2, 16, 1, 1)).shape == (2, 16, 1, 1)
    assert m(torch.randn(1, 16, 2, 3)).shape == (1, 16, 2, 3)
    assert visattn.create_attn('strip', 16, norm_layer=None).train()(torch.randn(1, 16, 1, 1)).shape == (1, 16, 1, 1)


@pytest.mark.parametrize('kwargs, arg', [
    (dict(kernel_size=2), 'kernel_size'),
    (dict(groups=3), 'groups'),
    (dict(groups=0), 'groups'),
])
def test_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        visattn.create_attn('strip', 32, **kwargs)


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
@pytest.mark.parametrize('kwargs', [{}, dict(groups=32, norm_layer=None, fuse=False, use_conv=False)])
def test_scripts(kwargs):
    m = _randomize(visattn.create_attn('strip', 32, **kwargs)).eval()
    scripted = torch.jit.script(m)
    x = torch.randn(2, 32, 5, 7)
    torch.testing.assert_close(scripted(x), m(x))


def test_inference_gates_in_place_only_its_own_map():
    m = _randomize(visattn.create_attn('strip', 16, fuse=False, norm_layer=None, use_conv=False)).eval()
    x = torch.randn(2, 16, 5, 7)
    before = x.clone()
    with torch.inference_mode():
        y = m(x)
    torch.testing.assert_close(x, before, rtol=0, atol=0)
    torch.testing.assert_close(y, x * F.sigmoid(x.mean(3, keepdim=True) + x.mean(2, keepdim=True)))
