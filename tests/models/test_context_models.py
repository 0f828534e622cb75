"""The context backbones: where each block sits, widths (parameter counts from the papers' layer widths), timm's
ResNet-50 weights loading into them, and the segmentation bridge (features_only at output stride 8)."""

import pytest
import timm
import torch

import visattn  # noqa: F401  (registers the models)

RESNET50 = 25_557_032


def _conv(cin, cout, bias=True):
    return cin * cout + (cout if bias else 0)


def _nl(c):  # θ, φ, g to C/2, W_z back to C, BN
    return 3 * _conv(c, c // 2) + _conv(c // 2, c) + 2 * c


def _efficient(c):  # keys, queries, values to C/2, reprojection back to C
    return 3 * _conv(c, c // 2) + _conv(c // 2, c)


def _pam(c):  # query, key to C/8, value to C, α
    return 2 * _conv(c, c // 8) + _conv(c, c) + 1


@pytest.mark.parametrize('name, extra', [
    ('resnet50_nl', 2 * _nl(512) + 3 * _nl(1024)),
    ('resnet50_efficient', 2 * _efficient(512) + 3 * _efficient(1024)),
    ('resnet50_cc', _pam(2048)),  # criss-cross has the widths of the position branch: q, k at C/8, v at C, γ
    ('resnet50_da', _pam(2048) + 1),  # + β of the channel branch
    ('resnet50_ema', _conv(2048, 2048, bias=False) + 2 * 2048),  # its conv_in is never trained: buffers
    ('resnet50_external', _conv(2048, 2048) + 2 * 64 * 2048 + _conv(2048, 2048, bias=False) + 2 * 2048),
])
def test_parameter_counts(name, extra):
    model = timm.create_model(name, device='meta')
    assert sum(p.numel() for p in model.parameters()) == RESNET50 + extra


@pytest.mark.parametrize('name, cls', [
    ('resnet50_issa', 'InterlacedSparseSelfAttn'), ('resnet50_lightnl', 'LightNonLocal'),
    ('resnet50_kronecker', 'KroneckerAttn'), ('resnet50_bat', 'BatNonLocalAttn'),
])
def test_second_wave_blocks_sit_in_the_non_local_places(name, cls):
    model = timm.create_model(name, device='meta')
    assert [n for n, _ in model.layer2.named_children()] == ['0', '1', 'attn1', '2', '3', 'attn3']
    assert [n for n, _ in model.layer3.named_children()] == ['0', '1', 'attn1', '2', '3', 'attn3', '4', '5', 'attn5']
    assert {type(model.layer3.attn5).__name__, type(model.layer2.attn1).__name__} == {cls}
    assert (model.layer2.attn1.channels, model.layer3.attn5.channels) == (512, 1024)


def test_ham_after_the_last_stage():
    model = timm.create_model('resnet50_ham', device='meta')
    ham = model.layer4[-1]
    assert type(ham).__name__ == 'Hamburger' and ham.channels == 2048
    # the bread: 2048 -> 512 (with bias) -> 2048 (no bias) + BN; NMF has no parameters
    assert sum(p.numel() for p in model.parameters()) == RESNET50 + _conv(2048, 512) + _conv(512, 2048, False) + 4096


def test_block_placement():
    nl = timm.create_model('resnet50_nl', device='meta')
    assert [n for n, _ in nl.layer2.named_children()] == ['0', '1', 'attn1', '2', '3', 'attn3']
    assert [n for n, _ in nl.layer3.named_children()] == ['0', '1', 'attn1', '2', '3', 'attn3', '4', '5', 'attn5']
    assert all(type(m).__name__ == 'Bottleneck' for m in (*nl.layer1, *nl.layer4))
    assert type(nl.layer3.attn5).__name__ == 'NonLocal' and nl.layer3.attn5.channels == 1024
    for name, cls in [('resnet50_cc', 'CrissCrossAttention'), ('resnet50_da', 'DualAttention'),
                      ('resnet50_ema', 'EMAttention'), ('resnet50_external', 'ExternalAttention')]:
        model = timm.create_model(name, device='meta')
        assert [type(s[-1]).__name__ for s in (model.layer1, model.layer2, model.layer3)] == ['Bottleneck'] * 3
        assert type(model.layer4[-1]).__name__ == cls and model.layer4[-1].channels == 2048


def test_bad_inner_placement():
    from timm.models.resnet import Bottleneck

    from visattn.layers import NonLocal
    from visattn.models import ContextResNet

    with pytest.raises(ValueError, match='layer2 has 4 blocks'):
        ContextResNet(Bottleneck, (3, 4, 6, 3), inner_attn_layer=NonLocal, inner_attn_after={2: (4,)}, device='meta')


@pytest.mark.parametrize('name', ['resnet50_nl', 'resnet50_ema'])
def test_resnet50_weights_load_leaving_only_attention_fresh(name):
    plain = timm.create_model('resnet50', device='meta').state_dict()
    result = timm.create_model(name, device='meta').load_state_dict(plain, strict=False, assign=True)
    assert not result.unexpected_keys
    assert result.missing_keys and all('.attn' in k or k.startswith('layer4.3.') for k in result.missing_keys)


def test_non_local_blocks_start_as_identity_inside_the_backbone():
    """After ResNet's own initialisation, every non-local block still passes its input through unchanged."""
    model = timm.create_model('resnet50_nl').train()
    seen = []
    for m in model.modules():
        if type(m).__name__ == 'NonLocal':
            m.register_forward_hook(lambda mod, inp, out: seen.append(torch.equal(out, inp[0])))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert seen == [True] * 5


def test_output_stride_8_features():
    model = timm.create_model('resnet50_cc', features_only=True, output_stride=8, out_indices=(1, 2, 3, 4)).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[-1] for o in outs] == [16, 8, 8, 8] and [o.shape[1] for o in outs] == [256, 512, 1024, 2048]
