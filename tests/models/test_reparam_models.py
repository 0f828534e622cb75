"""The re-parameterisable ResNets: parameter counts of both forms derived from the papers' branches, the deployed
network's outputs against the training form's (float32, eval, 1e-5), the deploy form built directly, initialisation
and timm's plain ResNet weights.

The ACNet and DBB papers publish accuracies of these ResNets (DBB Table 2: ResNet-18 69.54 -> 70.99, ResNet-50 76.14
-> 76.71; ACB 70.53 / 76.46), not parameter counts: the training-time counts below are those of their branches on
every 3×3 conv of timm's ResNet (the conv layers the released code replaces), and the deployed count is timm's
ResNet's less one C_out per replaced conv (its batch norm's 2·C_out folded into C_out conv biases).
"""

import copy

import pytest
import timm
import torch

import visattn

NAMES = ['resnet18_acnet', 'resnet50_acnet', 'resnet18_dbb', 'resnet50_dbb']


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _replaced_convs(depth: int) -> list[torch.nn.Conv2d]:
    plain = timm.create_model(f'resnet{depth}', device='meta')
    return [m for name, m in plain.named_modules()
            if isinstance(m, torch.nn.Conv2d) and name.startswith('layer') and m.kernel_size == (3, 3)]


def _extra(block: str, conv: torch.nn.Conv2d) -> int:
    """Parameters a block adds to a plain 3×3 conv-BN pair (groups 1)."""
    c, o = conv.in_channels, conv.out_channels
    if block == 'acnet':  # a 1×3 and a 3×1 conv, two more batch norms
        return 2 * 3 * c * o + 2 * 2 * o
    # DBB: 1×1 conv-BN; 1×1 conv-BN'-AVG-BN; identity-based 1×1 (C×C)-BN'-3×3-BN
    return (c * o + 2 * o) + (c * o + 2 * o + 2 * o) + (c * c + 2 * c + 9 * c * o + 2 * o)


@pytest.mark.parametrize('name,expected', [('resnet18_acnet', 19_028_520), ('resnet50_acnet', 33_116_968),
                                           ('resnet18_dbb', 26_288_296), ('resnet50_dbb', 40_684_456)])
def test_parameter_counts_of_both_forms(name, expected):
    """Plain timm ResNet-18 / 50: 11,689,512 / 25,557,032 parameters, 16 replaced 3×3 convs each (Σ C_out 3,840 /
    3,776)."""
    depth, block = int(name[6:8]), name.split('_')[1]
    plain = _count(timm.create_model(f'resnet{depth}', device='meta'))
    convs = _replaced_convs(depth)
    assert len(convs) == 16
    model = timm.create_model(name, device='meta')
    assert _count(model) == plain + sum(_extra(block, c) for c in convs) == expected
    visattn.reparameterize(model)
    assert _count(model) == plain - sum(c.out_channels for c in convs)
    assert _count(timm.create_model(name, device='meta', deploy=True)) == _count(model)


def _calibrated(name: str) -> torch.nn.Module:
    """Random norm weights and running statistics of real activations (one training pass with momentum 1), so that
    activations stay O(1) through the depth and the comparison is a relative one."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in norms:
            m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.2)
            m.momentum = 1.
        model.train()(torch.randn(8, 3, 64, 64))
    return model.eval()


@pytest.mark.parametrize('name', [pytest.param(n, marks=() if n == 'resnet18_acnet' else pytest.mark.slow)
                                  for n in NAMES])
def test_deployed_network_computes_the_training_form(name):
    """Float64: within 1e-10. Float32: within 1e-5 for ResNet-18 (outputs O(1)); at depth 50 the float32 training
    form itself is some 6e-5 away from its float64 value with these weights, so there the deployed network must be
    no farther from the training form than that rounding noise (it is 3.8e-5 for resnet50_acnet)."""
    model = _calibrated(name)
    model64 = copy.deepcopy(model).double()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want, want64 = model(x), model64(x.double())
        visattn.reparameterize(model), visattn.reparameterize(model64)
        got, got64 = model(x), model64(x.double())
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got64, want64, rtol=1e-10, atol=1e-10)
    if name.startswith('resnet18'):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    noise = (want.double() - want64).abs().max().item()
    assert (got - want).abs().max().item() <= max(2 * noise, 1e-5), noise
    twin = timm.create_model(name, num_classes=10, deploy=True).eval()
    twin.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), got, rtol=0, atol=0)


def test_initialisation_follows_timm():
    """timm's zero_init_last zeroes the last norm of every branch of a BasicBlock's conv2, not of conv1; DBB's
    identity-based 1×1 convs start at the identity (their W at 0) despite timm's Kaiming init of every Conv2d."""
    acnet = timm.create_model('resnet18_acnet')
    conv1, conv2 = acnet.layer1[0].conv1, acnet.layer1[0].conv2
    assert all(torch.all(bn.weight == 0) for bn in conv2.branch_output_norms())
    assert all(torch.all(bn.weight == 1) for bn in conv1.branch_output_norms())
    dbb = timm.create_model('resnet18_dbb')
    assert all(torch.all(m.dbb_1x1_kxk.idconv1.weight == 0) for m in dbb.modules() if hasattr(m, 'dbb_1x1_kxk'))
    assert dbb.layer2[0].conv2.dbb_origin.conv.weight.std() > 0


def test_plain_resnet_weights_load_except_the_replaced_convs():
    plain = timm.create_model('resnet50', device='meta').state_dict()
    result = timm.create_model('resnet50_dbb', device='meta').load_state_dict(plain, strict=False, assign=True)
    assert result.unexpected_keys and all('.conv2.' in k or '.bn2.' in k for k in result.unexpected_keys)
    assert result.missing_keys and all('.conv2.' in k for k in result.missing_keys)


def test_output_stride_and_deploy_flag_errors():
    with pytest.raises(TypeError, match='deploy'):
        timm.create_model('resnet18_acnet', deploy='yes')
    model = timm.create_model('resnet18_acnet', features_only=True, output_stride=8, device='meta')
    assert model.layer4[0].conv2.dilation == 4
    with pytest.raises(ValueError, match='dilation'):
        timm.create_model('resnet18_dbb', output_stride=8, device='meta')
