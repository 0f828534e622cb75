"""The second-wave gating backbones: parameter counts against the papers' tables, where each block sits, and timm's
plain weights loading into them with only the attention fresh (forward, backward and features of every model run
in test_models.py)."""

import pytest
import timm
import torch

import visattn  # noqa: F401 - registers the models

RESNET50 = 25_557_032


def _count(name: str) -> int:
    return sum(p.numel() for p in timm.create_model(name, device='meta').parameters())


@pytest.mark.parametrize('name, paper_millions, source', [
    ('epsanet50', 22.56, 'EPSANet (2105.14447), EPSANet-50 (Small)'),
    ('epsanet101', 38.90, 'EPSANet, EPSANet-101 (Small)'),
    ('resnet50_triplet', 25.56, 'Triplet attention (2010.03045), ResNet-50 + triplet'),
    ('resnet18_triplet', 11.69, 'Triplet attention, ResNet-18 + triplet'),
    ('mobilenetv2_100_triplet', 3.51, 'Triplet attention, MobileNetV2 + triplet'),
    ('mobilenetv2_100_coord', 3.95, 'Coordinate attention (2103.02907), MobileNetV2 + CA'),
    ('resnet50_shuffle', 25.56, 'SA-Net (2102.00240), SA-Net-50'),
    ('resnet101_shuffle', 44.55, 'SA-Net, SA-Net-101'),
    ('resnet50_sge', 25.56, 'SGE (1905.09646), SGE-ResNet-50'),
    ('resnet101_sge', 44.55, 'SGE, SGE-ResNet-101'),
    ('resnet50_simam', 25.56, 'SimAM (ICML 2021): ResNet-50 + SimAM, no parameters'),
    ('resnet18_simam', 11.69, 'SimAM: ResNet-18 + SimAM'),
])
def test_parameter_counts_match_the_papers(name, paper_millions, source):
    assert round(_count(name) / 1e6, 2) == paper_millions, source


def test_parameter_free_and_exact_counts():
    assert _count('resnet50_simam') == _count('resnet50_ge') == RESNET50  # SimAM and GE-θ⁻ own no parameters
    # A²-Net: five blocks of φ, θ, ρ (C -> C/2, biases) and the output conv (C/2 -> C, bias) at C = 512, 512, 1024 x 3
    a2 = sum(3 * (c * c // 2 + c // 2) + (c // 2 * c + c) for c in (512, 512, 1024, 1024, 1024))
    assert _count('resnet50_a2') == RESNET50 + a2
    # eSE and SSE: one C -> C gate (eSE with a bias; SSE with its input batch norm) after each of the four stages
    stages = (256, 512, 1024, 2048)
    assert _count('resnet50_ese') == RESNET50 + sum(c * c + c for c in stages)
    assert _count('resnet50_parnet') == RESNET50 + sum(c * c + 2 * c for c in stages)
    # SPNet's strip pooling module at the bottleneck width w (3×1 and 1×3 w -> w convs with BN, 1×1 w -> w with bias),
    # in the last block of stages 1-3 and every block of stage 4
    spm = sum(2 * (3 * w * w + 2 * w) + w * w + w for w in (64, 128, 256, 512, 512, 512))
    assert _count('resnet50_strip') == RESNET50 + spm


def test_block_placement():
    simam = timm.create_model('resnet50_simam', device='meta')
    blk = simam.layer2[0]
    assert type(blk.conv2_attn).__name__ == 'SimAM' and blk.conv2_attn.channels == blk.conv2.out_channels == 128
    assert blk.conv2_attn.e_lambda == 0.1 and blk.se is None  # the released ImageNet recipes' λ
    eps = timm.create_model('epsanet50', device='meta')
    assert type(eps.layer3[0].conv2).__name__ == 'PyramidSplitAttn'
    assert type(eps.layer3[0].bn2).__name__ == 'BatchNorm2d'  # its BN and ReLU stay
    splat = timm.create_model('resnet50_splat', device='meta')
    assert type(splat.layer1[0].conv2).__name__ == 'SplitAttn' and splat.layer1[0].conv2.radix == 2
    for name in ('resnet50_triplet', 'resnet18_sge', 'resnet34_shuffle', 'resnet101_coord', 'resnet50_ge'):
        model = timm.create_model(name, device='meta')
        assert all(b.se is not None for s in (model.layer1, model.layer4) for b in s), name
    strip = timm.create_model('resnet50_strip', device='meta')
    assert [type(b.mid_attn).__name__ for b in strip.layer3] == ['Identity'] * 5 + ['StripAttn']
    assert all(type(b.mid_attn).__name__ == 'StripAttn' for b in strip.layer4)
    ese = timm.create_model('resnet50_ese', device='meta')
    assert [type(s[-1]).__name__ for s in (ese.layer1, ese.layer2, ese.layer3, ese.layer4)] == \
        ['EffectiveSqueezeExcite'] * 4
    coord = timm.create_model('mobilenetv2_100_coord', device='meta')
    blocks = [b for stage in coord.blocks for b in stage]
    assert len(blocks) == 17 and isinstance(blocks[0].se, torch.nn.Identity)  # not in the non-expanding block
    assert all(type(b.se).__name__ == 'CoordAttn' for b in blocks[1:])
    assert blocks[1].se.channels == 96  # after the depthwise conv: the expanded width
    triplet = timm.create_model('mobilenetv2_100_triplet', device='meta')
    blocks = [b for stage in triplet.blocks for b in stage]
    assert all(type(b.end_attn).__name__ == 'TripletAttn' and isinstance(b.se, torch.nn.Identity) for b in blocks)


@pytest.mark.parametrize('name, base, attn_key', [
    ('resnet50_triplet', 'resnet50', '.se.'),
    ('resnet18_coord', 'resnet18', '.se.'),
    ('mobilenetv2_100_coord', 'mobilenetv2_100', '.se.'),
    ('mobilenetv2_100_triplet', 'mobilenetv2_100', '.end_attn.'),
    ('resnet50_a2', 'resnet50', '.attn'),
])
def test_plain_weights_load_leaving_only_attention_fresh(name, base, attn_key):
    plain = timm.create_model(base, device='meta').state_dict()
    result = timm.create_model(name, device='meta').load_state_dict(plain, strict=False, assign=True)
    assert not result.unexpected_keys
    assert result.missing_keys and all(attn_key in k for k in result.missing_keys), result.missing_keys[:3]


def test_end_attention_block_keeps_timms_outputs_when_it_is_the_identity():
    """With its attention replaced by the identity, the triplet MobileNetV2 is timm's mobilenetv2_100."""
    torch.manual_seed(0)
    theirs = timm.create_model('mobilenetv2_100').eval()
    ours = timm.create_model('mobilenetv2_100_triplet').eval()
    ours.load_state_dict(theirs.state_dict(), strict=False)
    for stage in ours.blocks:
        for block in stage:
            block.end_attn = torch.nn.Identity()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_simam_resnet_is_resnet_with_the_gate_after_conv2():
    torch.manual_seed(0)
    theirs = timm.create_model('resnet18', zero_init_last=False).eval()  # a zero last BN would hide the gate
    ours = timm.create_model('resnet18_simam').eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)  # SimAM owns nothing
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(ours(x), theirs(x))
        for stage in (ours.layer1, ours.layer2, ours.layer3, ours.layer4):
            for block in stage:
                block.conv2_attn = torch.nn.Identity()
        torch.testing.assert_close(ours(x), theirs(x))
