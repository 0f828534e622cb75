"""Parameter counts of the local self-attention backbones (built on the meta device) against their papers, and the
structure the papers describe."""

import pytest
import timm
import torch

import visattn
from visattn.layers import AxialAttn, HaloAttn, SasaStem, SelfAttn2d


def _count(name: str, **kwargs) -> int:
    return sum(p.numel() for p in timm.create_model(name, device='meta', **kwargs).parameters())


# name -> (paper's figure, relative tolerance); SASA: arXiv:1906.05909 Table 1; HaloNet: arXiv:2103.12731 Table 2
@pytest.mark.parametrize('name, paper, tol', [
    ('sasa_resnet26', 10.3e6, 0.01), ('sasa_resnet38', 14.1e6, 0.01), ('sasa_resnet50', 18.0e6, 0.01),
    ('halonet_h0', 5.5e6, 0.01), ('halonet_h2', 9.4e6, 0.01), ('halonet_h3', 11.8e6, 0.01),
    ('halonet_h4', 19.1e6, 0.01),
    # Axial-DeepLab Table 1 gives 12.5M (full) / 12.4M (conv stem); with DeepLab2's 509-position relative
    # embedding tables these have 12.49M each (0.06% / 0.74% off)
    ('axial_resnet50', 12.5e6, 0.01), ('axial_resnet50_convstem', 12.4e6, 0.01),
])
def test_params_match_paper(name, paper, tol):
    n = _count(name)
    assert abs(n - paper) <= tol * paper, f'{name}: {n:,} parameters, paper {paper:,.0f}'


def test_halonet_h1_is_timms_and_ours_sort_with_it():
    assert 'halonet_h1' not in visattn.list_models()
    assert {'halonet_h0', 'halonet_h2', 'halonet_h3', 'halonet_h4'} <= set(visattn.list_models('halonet_h*'))


def test_sasa_resnet_structure():
    m = timm.create_model('sasa_resnet26', device='meta')
    assert isinstance(m.conv1, SasaStem) and m.maxpool.kernel_size == 4
    attn = [b.conv2 for s in (m.layer1, m.layer2, m.layer3, m.layer4) for b in s]
    assert len(attn) == 8 and all(isinstance(a, SelfAttn2d) for a in attn)
    assert all(a.kernel_size == 7 and a.num_heads == 8 for a in attn)
    assert [a.stride for a in attn] == [1, 2, 1, 2, 1, 1, 1, 2]
    assert not any(isinstance(mod, torch.nn.Conv2d) and mod.kernel_size != (1, 1) for mod in m.modules())
    conv = timm.create_model('sasa_resnet26', device='meta', stem='conv')
    assert conv.conv1.kernel_size == (7, 7)


def test_axial_resnet_structure():
    full = timm.create_model('axial_resnet50', device='meta')
    conv = timm.create_model('axial_resnet50_convstem', device='meta')
    assert isinstance(full.conv1, AxialAttn) and full.conv1.height.span == 15 and full.conv1.stride == 2
    assert conv.conv1.kernel_size == (7, 7)
    blocks = [b for s in (full.layer1, full.layer2, full.layer3, full.layer4) for b in s]
    assert all(isinstance(b.conv2, AxialAttn) and b.conv2.height.span is None for b in blocks)
    # relative embeddings for offsets up to 254 in every global layer, as DeepLab2 (MAX_SPAN = 255)
    assert all(b.conv2.height.reach == b.conv2.width.reach == 254 for b in blocks)
    assert all(b.conv2.height.relative.shape[1] == 509 for b in blocks)
    assert full.num_features == 1024
    # rel_span='feature': sized for a 224² input, as csrhddlam/axial-deeplab: 56, 56→28, 28→14, 14→7
    feat = timm.create_model('axial_resnet50', device='meta', rel_span='feature')
    reach = [b.conv2.height.reach + 1 for s in (feat.layer1, feat.layer2, feat.layer3, feat.layer4) for b in s]
    assert reach == [56] * 3 + [56] + [28] * 3 + [28] + [14] * 5 + [14] + [7] * 2
    with pytest.raises(ValueError, match='rel_span'):
        timm.create_model('axial_resnet50', device='meta', rel_span=0)


def test_axial_resnet_counts_match_reference_code():
    # DeepLab2 model/encoder/axial_resnet_instances_test.py: axial_resnet_s backbone (no classifier) 11,466,912
    assert _count('axial_resnet50_convstem', num_classes=0) == 11_466_912
    # csrhddlam/axial-deeplab lib/models/axialnet.py axial50s (32-channel stem): 11,586,216; with the
    # 64-channel stem (+3·49·32 + 2·32 in the stem, +32·64 + 32·128 in the first block) 10,912 more
    assert _count('axial_resnet50_convstem', rel_span='feature') == 11_586_216 + 10_912


@pytest.mark.parametrize('name, block, halo, heads', [('halonet_h0', 8, 3, [4, 8, 8, 8]),
                                                        ('halonet_h4', 12, 2, [4, 8, 8, 8])])
def test_halonet_structure(name, block, halo, heads):
    m = timm.create_model(name, device='meta')
    attn = [mod for mod in m.modules() if isinstance(mod, HaloAttn)]
    assert all(a.block_size == block and a.halo_size == halo for a in attn)
    assert [s[0].self_attn.num_heads for s in m.stages] == heads
    assert isinstance(m.stages[0][0].act, torch.nn.SiLU)
