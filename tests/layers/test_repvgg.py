"""RepVGG block: the training form against the paper's branch sum written out (float64, outputs and gradients, eval
and training mode), the fusion (float64 1e-10, float32 1e-5), timm's ``RepVggBlock`` weights in both forms, and
RepVGG-A0 built from visattn's blocks against timm's ``repvgg_a0`` and the paper's parameter count."""

import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.byobnet import RepVggBlock as TimmRepVggBlock

import visattn
from visattn.layers import RepVggBlock
from visattn.layers.repvgg import convert_official_repvgg

sys.path.insert(0, str(Path(__file__).parent))
from _reparam_ref import bn, check_against, check_fusion, check_scripts, random_block  # noqa: E402

CASES = [dict(), dict(out_channels=12, stride=2), dict(groups=2, dilation=2), dict(kernel_size=5, act_layer=None)]


def reference(m: RepVggBlock, x: torch.Tensor, training: bool) -> torch.Tensor:
    """The paper's block: ``ReLU(BN(W₃ ∗ x) + BN(W₁ ∗ x) + BN(x))``, each conv called on its own."""
    kxk, one = m.conv_kxk, m.conv_1x1
    y = bn(F.conv2d(x, kxk.conv.weight, None, m.stride, m.padding, m.dilation, m.groups), kxk.bn, training)
    y = y + bn(F.conv2d(x, one.conv.weight, None, m.stride, 0, 1, m.groups), one.bn, training)
    if m.in_channels == m.out_channels and m.stride == 1:
        y = y + bn(x, m.identity, training)
    return torch.relu(y) if isinstance(m.act, torch.nn.ReLU) else y


@pytest.mark.parametrize('kwargs', CASES, ids=str)
@pytest.mark.parametrize('training', [False, True])
def test_training_form_is_the_branch_sum(kwargs, training):
    m = random_block(RepVggBlock(8, dtype=torch.float64, **kwargs))
    assert (m.identity is not None) == (kwargs.get('out_channels', 8) == 8 and kwargs.get('stride', 1) == 1)
    check_against(m, lambda x, t: reference(m, x, t), torch.randn(2, 8, 7, 9, dtype=torch.float64), training)


@pytest.mark.parametrize('kwargs', CASES, ids=str)
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_deploy_form_equals_training_form(kwargs, dtype, tol):
    m = random_block(RepVggBlock(8, dtype=dtype, **kwargs))
    twin = lambda: RepVggBlock(8, deploy=True, dtype=dtype, **kwargs)  # noqa: E731
    check_fusion(m, torch.randn(2, 8, 7, 9, dtype=dtype), tol, twin)


@pytest.mark.parametrize('in_chs,out_chs,stride', [(8, 8, 1), (8, 12, 2), (3, 8, 2)])
def test_timm_block_weights_load_in_both_forms(in_chs, out_chs, stride):
    """Same child names as timm's ``RepVggBlock``: its state dict loads strictly, train form and deploy form, and both
    compute timm's output in float64."""
    theirs = random_block(TimmRepVggBlock(in_chs, out_chs, stride=stride, dtype=torch.float64))
    ours = RepVggBlock(in_chs, out_channels=out_chs, stride=stride, dtype=torch.float64).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, in_chs, 7, 9, dtype=torch.float64)
    for training in (False, True):
        theirs.train(training), ours.train(training)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)
    theirs.eval(), ours.eval()
    theirs.reparameterize()
    deployed = RepVggBlock(in_chs, out_channels=out_chs, stride=stride, deploy=True, dtype=torch.float64)
    deployed.load_state_dict(theirs.state_dict(), strict=True)
    ours.reparameterize()
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), theirs(x), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)


def _swap_in_visattn_blocks(model: torch.nn.Module) -> int:
    """Replace every timm ``RepVggBlock`` of ``model`` by visattn's with its weights; returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, TimmRepVggBlock):
                conv = child.conv_kxk.conv
                ours = RepVggBlock(conv.in_channels, out_channels=conv.out_channels, stride=conv.stride[0],
                                   groups=conv.groups, device=conv.weight.device, dtype=conv.weight.dtype)
                ours.load_state_dict(child.state_dict(), strict=True, assign=conv.weight.is_meta)
                setattr(parent, name, ours)
                swapped += 1
    return swapped


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_repvgg_a0_parameter_counts_with_visattn_blocks():
    """timm's ``repvgg_a0`` with each of its 22 blocks replaced by visattn's has timm's parameter counts in both forms:
    9,108,968 training, 8,309,384 deployed (timm's own count after its ``reparameterize_model``, which cannot run on
    the meta device). The paper's Table 4 gives RepVGG-A0 8.30M parameters (inference):
    8,309,384 less the 4,496 biases of its fused convs is 8,304,888, so the paper counts the kernels only, or
    truncates 8.309M."""
    theirs = timm.create_model('repvgg_a0', device='meta')
    ours = timm.create_model('repvgg_a0', device='meta')
    assert _swap_in_visattn_blocks(ours) == 22
    assert _count(ours) == _count(theirs) == 9_108_968
    visattn.reparameterize(ours)
    assert _count(ours) == 8_309_384
    assert abs(8_309_384 - 4_496 - 8.30e6) < 0.005e6


@pytest.mark.slow
def test_repvgg_a0_outputs_with_visattn_blocks():
    """The same swap with random weights and statistics: timm's state dict loads strictly into the swapped model and
    both compute the same float64 outputs, before and after `visattn.reparameterize`."""
    torch.manual_seed(0)
    theirs = timm.create_model('repvgg_a0', num_classes=10).double()
    with torch.no_grad():
        for name, b in theirs.named_buffers():
            if name.endswith('running_var'):
                b.uniform_(0.5, 1.5)
            elif name.endswith('running_mean'):
                b.normal_(0, 0.1)
    ours = timm.create_model('repvgg_a0', num_classes=10).double()
    _swap_in_visattn_blocks(ours)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    theirs.eval(), ours.eval()
    with torch.no_grad():
        want = theirs(x)
        torch.testing.assert_close(ours(x), want, rtol=1e-10, atol=1e-10)
        visattn.reparameterize(theirs), visattn.reparameterize(ours)
        torch.testing.assert_close(ours(x), want, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(theirs(x), want, rtol=1e-9, atol=1e-9)


def test_released_code_keys_are_renamed():
    m = random_block(RepVggBlock(8, dtype=torch.float64))
    released = {'conv_kxk.': 'rbr_dense.', 'conv_1x1.': 'rbr_1x1.', 'identity.': 'rbr_identity.'}
    official = {}
    for key, value in m.state_dict().items():
        prefix = next(p for p in released if key.startswith(p))
        official[released[prefix] + key[len(prefix):]] = value
    twin = RepVggBlock(8, dtype=torch.float64)
    twin.load_state_dict(convert_official_repvgg(official), strict=True)
    x = torch.randn(1, 8, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(twin.eval()(x), m(x))
    nested = convert_official_repvgg({'stage1.0.rbr_reparam.weight': 0, 'stage1.0.rbr_dense.bn.bias': 1, 'fc.bias': 2})
    assert list(nested) == ['stage1.0.reparam_conv.weight', 'stage1.0.conv_kxk.bn.bias', 'fc.bias']


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
def test_scripts_in_both_forms():
    check_scripts(random_block(RepVggBlock(8)), torch.randn(2, 8, 5, 7))


def test_init_gamma_zeroes_every_branch():
    m = RepVggBlock(8).eval()
    m.init_gamma(0.)
    assert torch.count_nonzero(m(torch.randn(1, 8, 4, 4))) == 0
