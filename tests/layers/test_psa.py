"""PSA against a float64 reference written from the paper's equations (SPC branches, shared SE weight, softmax across
the branches, reweight, concatenate), at odd sizes and 1×1, with stride and out_channels, and each option; and the
parameter count of the paper's EPSANet-50 / -101 (Small)."""

import math
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from test_gating_blocks import _check_against_reference, _fc, _p  # noqa: E402


def ref_psa(x, m, kernels=(3, 5, 7, 9), groups=(1, 4, 8, 16), stride=1, split=False, reverse=False):
    """F_i = Conv(k_i, G_i)(X) (or of the i-th input slice), Z_i = σ(fc2(δ(fc1(GAP(F_i))))), att = softmax_i(Z),
    Out = Cat([F_i · att_i]) in the paper's order (or the released code's reverse order)."""
    s = len(kernels)
    inputs = x.chunk(s, 1) if split else [x] * s
    feats = [F.conv2d(xi, _p(m, f'convs.{i}.weight'), stride=stride, padding=k // 2, groups=g)
             for i, (xi, k, g) in enumerate(zip(inputs, kernels, groups))]
    z = torch.stack([torch.sigmoid(_fc(torch.relu(_fc(f.mean((2, 3)), m, 'se.fc1')), m, 'se.fc2')) for f in feats], 1)
    att = torch.softmax(z, dim=1)  # [B, S, C_out/S], across the branches
    out = [f * att[:, i, :, None, None] for i, f in enumerate(feats)]
    return torch.cat(out[::-1] if reverse else out, 1)


@pytest.mark.parametrize('hw', [(7, 9), (13, 17), (1, 1)])
@pytest.mark.parametrize('training', [False, True])
def test_reference(hw, training):
    m = visattn.create_attn('psa', 64)
    _check_against_reference(m, ref_psa, torch.randn(2, 64, *hw), training)


@pytest.mark.parametrize('hw', [(7, 9), (1, 1), (2, 5)])
@pytest.mark.parametrize('stride, out_channels', [(2, 128), (2, 64), (3, 64), (1, 128)])
def test_stride_and_out_channels(hw, stride, out_channels):
    m = visattn.create_attn('psa', 64, out_channels=out_channels, stride=stride)
    x = torch.randn(2, 64, *hw)
    want = (2, out_channels, math.ceil(hw[0] / stride), math.ceil(hw[1] / stride))
    assert m.eval()(x).shape == want
    _check_against_reference(m, lambda x, m: ref_psa(x, m, stride=stride), x)


@pytest.mark.parametrize('split, reverse', [(True, False), (False, True), (True, True)])
def test_split_input_and_reverse_concat(split, reverse):
    m = visattn.create_attn('psa', 64, out_channels=128, stride=2, split_input=split, reverse_concat=reverse)
    assert m.convs[0].in_channels == (16 if split else 64)
    _check_against_reference(m, lambda x, m: ref_psa(x, m, stride=2, split=split, reverse=reverse),
                             torch.randn(2, 64, 7, 9))


@pytest.mark.parametrize('kernels, groups', [((3, 5), (1, 2)), ((1, 3, 5), (1, 2, 4)), ((3,), (4,))])
def test_other_pyramids(kernels, groups):
    m = visattn.create_attn('psa', 24, kernel_sizes=kernels, groups=groups, rd_channels=2)
    assert m.num_branches == len(kernels) and m.se.fc1.out_channels == 2
    _check_against_reference(m, lambda x, m: ref_psa(x, m, kernels, groups), torch.randn(2, 24, 5, 7))


def test_reverse_concat_permutes_the_output_channels():
    m = visattn.create_attn('psa', 64)
    r = visattn.create_attn('psa', 64, reverse_concat=True)
    r.load_state_dict(m.state_dict())
    x = torch.randn(2, 64, 5, 7)
    a, b = m(x).view(2, 4, 16, 5, 7), r(x).view(2, 4, 16, 5, 7)
    torch.testing.assert_close(a.flip(1), b)


def test_defaults_and_widths():
    m = visattn.create_attn('psa', 256)
    assert m.out_channels == 256 and m.branch_channels == 64 and m.num_branches == 4
    assert [(c.kernel_size[0], c.groups, c.padding[0], c.bias) for c in m.convs] == [
        (3, 1, 1, None), (5, 4, 2, None), (7, 8, 3, None), (9, 16, 4, None)]
    assert m.rd_channels == 4 and m.se.fc1.bias is not None  # C_out/S // 16, with biases, as the released code
    assert set(m.state_dict()) == {f'convs.{i}.weight' for i in range(4)} | {
        'se.fc1.weight', 'se.fc1.bias', 'se.fc2.weight', 'se.fc2.bias'}
    assert visattn.create_attn('psa', 64).rd_channels == 1


@pytest.mark.parametrize('blocks, want', [((3, 4, 6, 3), 22_561_715), ((3, 4, 23, 3), 38_900_279)])
def test_epsanet_small_parameter_count(blocks, want):
    """A ResNet with each bottleneck's 3×3 conv replaced by PSA (stride on PSA) is EPSANet (Small): 22.56M and
    38.90M parameters in the paper's table and the released README."""
    with torch.device('meta'):
        model = timm.create_model('resnet50', layers=list(blocks))
        for mod in model.modules():
            if isinstance(mod, timm.models.resnet.Bottleneck):
                conv = mod.conv2
                mod.conv2 = visattn.create_attn('psa', conv.in_channels, out_channels=conv.out_channels,
                                                stride=conv.stride[0])
    assert sum(p.numel() for p in model.parameters()) == want


def test_bad_arguments():
    with pytest.raises(ValueError, match='out_channels must be divisible by the number of branches S=4, got 30'):
        visattn.create_attn('psa', 64, out_channels=30)
    with pytest.raises(ValueError, match='groups must have one entry per branch'):
        visattn.create_attn('psa', 64, groups=(1, 4, 8))
    with pytest.raises(ValueError, match='groups: 16'):
        visattn.create_attn('psa', 32)  # 8 channels per branch
    with pytest.raises(ValueError, match='kernel_sizes'):
        visattn.create_attn('psa', 64, kernel_sizes=(3, 4, 7, 9))
    with pytest.raises(ValueError, match='kernel_sizes'):
        visattn.create_attn('psa', 64, kernel_sizes=(), groups=())
    with pytest.raises(ValueError, match='split_input'):
        visattn.create_attn('psa', 30, out_channels=32, groups=(1, 1, 1, 1), split_input=True)
    with pytest.raises(ValueError, match='groups'):
        visattn.create_attn('psa', 64, groups=(1, 4, 0, 16))
    with pytest.raises(ValueError, match='stride'):
        visattn.create_attn('psa', 64, stride=0)


def test_inference_path_and_scripted():
    m = visattn.create_attn('psa', 32, out_channels=64, stride=2, groups=(1, 2, 4, 8)).eval()
    x = torch.randn(2, 32, 7, 9)
    with torch.inference_mode():
        fast = m(x)
    torch.testing.assert_close(fast, m(x.requires_grad_()).detach())
    for mod in (m, visattn.create_attn('psa', 32, groups=(1, 2, 4, 8), split_input=True, reverse_concat=True)):
        torch.testing.assert_close(torch.jit.script(mod)(x), mod(x))
