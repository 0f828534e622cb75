"""PoolFormer backbones (``poolformerv1_*``): parameter counts against timm's ``poolformer_*`` and the paper, timm's
state dict (random weights, layer scales included) loading through ``checkpoint_filter_fn`` and computing timm's
outputs and gradients in float64, the released checkpoint layout and its map-norm head against a functional
reference, the released configurations, any input size, features, TorchScript, torch.fx and timm's model API.

timm's MetaFormer is the independent reference: its pooling, blocks, stem, downsampling and head are timm's code, not
ours. Its layer scales start at 1e-5 / 1e-6, which would hide a wrong token mixer or MLP below the tolerance, so every
parameter is drawn at random (the layer scales around 1) before the comparison."""

import re

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import GroupNorm1
from timm.models._features_fx import create_feature_extractor
from timm.models.metaformer import MetaFormer

import visattn  # noqa: F401  (registers the models)
from visattn.layers import PoolMixer
from visattn.models.poolformer import checkpoint_filter_fn

SIZES = ('s12', 's24', 's36', 'm36', 'm48')
# "MetaFormer Is Actually What You Need for Vision" (arXiv:2111.11418), Table 1; the released README: the same
PAPER_M = {'s12': 12, 's24': 21, 's36': 31, 'm36': 56, 'm48': 73}
EXACT = {'s12': 11_915_176, 's24': 21_388_968, 's36': 30_862_760, 'm36': 56_172_520, 'm48': 73_473_448}
# timm's poolformer_s12 arguments (timm/models/metaformer.py) at a narrow width, for the cheap checks
TIMM_V1 = dict(downsample_norm=None, mlp_act=nn.GELU, mlp_bias=True, norm_layers=GroupNorm1,
               layer_scale_init_values=1e-5, res_scale_init_values=None, use_mlp_head=False)
NARROW = dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_classes=10)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _randomize(model: nn.Module) -> nn.Module:
    """Every parameter random, drawn in float32 (so that a float64 copy is exact): norm weights around 1, layer
    scales around 1 (timm's start at 1e-5, which would hide the branches), the rest small."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if 'layer_scale' in n:
                p.copy_(torch.randn_like(p) * 0.3 + 1.)
            elif 'norm' in n and n.endswith('weight'):
                p.copy_(torch.randn_like(p) * 0.2 + 1.)
            else:
                p.copy_(torch.randn_like(p) * 0.05)
    return model.eval()


def _narrow_timm() -> nn.Module:
    return _randomize(MetaFormer(depths=NARROW['depths'], dims=NARROW['dims'], num_classes=10, **TIMM_V1))


def _load(state_dict: dict, path, **kw) -> nn.Module:
    """``poolformerv1_s12`` (of the sizes in ``kw``) with the weights of the file ``path``, through timm's loader and
    `checkpoint_filter_fn` (``num_classes`` in the overlay too: timm drops a classifier of another size)."""
    torch.save(state_dict, path)
    overlay = dict(file=str(path), num_classes=kw.get('num_classes', 1000))
    return timm.create_model('poolformerv1_s12', pretrained=True, pretrained_cfg_overlay=overlay, **kw)


def test_parameter_counts_equal_timms_and_match_the_paper():
    for size in SIZES:
        n = _count(timm.create_model(f'poolformerv1_{size}', device='meta'))
        assert n == EXACT[size] == _count(timm.create_model(f'poolformer_{size}', device='meta')), (size, n)
        assert round(n / 1e6) == PAPER_M[size], (size, n)


def test_timm_state_dict_computes_timms_outputs_at_224(tmp_path):
    torch.manual_seed(0)
    ref = _randomize(timm.create_model('poolformer_s12'))
    ours = _load(ref.state_dict(), tmp_path / 's12.pth').double().eval()
    ref = ref.double()
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        feats = ours.forward_features(x)
        torch.testing.assert_close(feats, ref.forward_features(x), rtol=0, atol=1e-8)
        torch.testing.assert_close(ours.forward_head(feats), ref.forward_head(feats), rtol=0, atol=1e-8)
    assert feats.shape == (1, 512, 7, 7)


@pytest.mark.slow
@pytest.mark.parametrize('size', SIZES[1:])
def test_full_width_timm_state_dicts_compute_timms_outputs(size, tmp_path):
    torch.manual_seed(3)
    ref = _randomize(timm.create_model(f'poolformer_{size}'))
    path = tmp_path / f'{size}.pth'
    torch.save(ref.state_dict(), path)
    ours = timm.create_model(f'poolformerv1_{size}', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    ours, ref = ours.double().eval(), ref.double()
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-8)


def test_timm_state_dict_computes_timms_gradients_and_sees_a_wrong_mixer(tmp_path):
    torch.manual_seed(1)
    ref = _narrow_timm().double()
    ours = _load(ref.state_dict(), tmp_path / 'narrow.pth', **NARROW).double().eval()
    assert all(type(b.token_mixer) is PoolMixer for s in ours.stages for b in s.blocks)
    xa = torch.randn(2, 3, 61, 75, dtype=torch.float64, requires_grad=True)  # odd sides: maps 15×19, 8×10, 4×5, 2×3
    xb = xa.detach().clone().requires_grad_()
    out_a, out_b = ours(xa), ref(xb)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-8)
    w = torch.randn_like(out_a)
    (out_a * w).sum().backward()
    (out_b * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-8)
    want = checkpoint_filter_fn({n: p.grad for n, p in ref.named_parameters()}, ours)
    got = {n: p.grad for n, p in ours.named_parameters()}
    assert set(got) == set(want)
    for n, g in got.items():
        torch.testing.assert_close(g, want[n], rtol=0, atol=1e-8, msg=n)
    ours.stages[2].blocks[1].token_mixer.pool_size = 5  # a wrong mixer in one block is far outside the tolerance
    with torch.no_grad():
        assert (ours(xa) - out_b).abs().max() > 1e-3


def _released_layout(state_dict: dict) -> dict:
    """timm's keys -> the released checkpoint's (sail-sg/poolformer ``models/poolformer.py``)."""
    out = {}
    for key, value in state_dict.items():
        key = key.replace('stem.conv.', 'patch_embed.proj.')
        key = re.sub(r'layer_scale([12])\.scale$', r'layer_scale_\1', key)
        if m := re.match(r'stages\.(\d+)\.downsample\.conv\.(.*)', key):
            key = f'network.{2 * int(m.group(1)) - 1}.proj.{m.group(2)}'
        elif m := re.match(r'stages\.(\d+)\.blocks\.(.*)', key):
            key = f'network.{2 * int(m.group(1))}.{m.group(2)}'
        elif key.startswith('head.norm.'):
            key = key[len('head.'):]
        elif key.startswith('head.fc.'):
            key = 'head.' + key[len('head.fc.'):]
        out[key] = value
    return out


def test_released_layout_and_the_map_norm_head():
    torch.manual_seed(2)
    ref = _narrow_timm()
    released = _released_layout(ref.state_dict())
    assert 'network.6.0.layer_scale_2' in released and 'network.5.proj.weight' in released
    assert 'norm.weight' in released and 'head.weight' in released
    pooled = timm.create_model('poolformerv1_s12', **NARROW)
    want = checkpoint_filter_fn(ref.state_dict(), pooled)
    got = checkpoint_filter_fn({'model': released}, pooled)
    assert set(got) == set(want) == set(pooled.state_dict())
    for key, value in got.items():
        assert torch.equal(value, want[key]), key
    assert set(checkpoint_filter_fn(pooled.state_dict(), pooled)) == set(pooled.state_dict())  # ours passes
    # the released head: GroupNorm over the last map, then average pooling and the classifier
    mapped = timm.create_model('poolformerv1_s12', head_norm='map', **NARROW).eval()
    mapped.load_state_dict(checkpoint_filter_fn(released, mapped), strict=True)
    ref, mapped = ref.double(), mapped.double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        last = ref.forward_features(x)
        normed = F.group_norm(last, 1, released['norm.weight'].double(), released['norm.bias'].double(), 1e-5)
        want = F.linear(normed.mean((2, 3)), released['head.weight'].double(), released['head.bias'].double())
        torch.testing.assert_close(mapped.forward_features(x), normed, rtol=0, atol=1e-10)
        torch.testing.assert_close(mapped(x), want, rtol=0, atol=1e-10)
        assert (ref(x) - want).abs().max() > 1e-3  # timm's pooled-norm head is another function


def test_released_configurations():
    m = timm.create_model('poolformerv1_m48', device='meta')
    assert [len(s.blocks) for s in m.stages] == [8, 8, 24, 8]
    assert [s.blocks[0].norm1.num_channels for s in m.stages] == [96, 192, 384, 768]
    blk = m.stages[2].blocks[0]
    assert type(blk.token_mixer) is PoolMixer and blk.token_mixer.pool_size == 3
    assert isinstance(blk.norm1, GroupNorm1) and blk.norm1.num_groups == 1
    assert blk.mlp.fc1.kernel_size == (1, 1) and blk.mlp.fc1.out_channels == 4 * 384
    assert isinstance(blk.mlp.act, nn.GELU)
    assert abs(m.stages[3].blocks[7].drop_path2.drop_prob - 0.4) < 1e-12
    assert isinstance(m.stages[0].blocks[0].drop_path1, nn.Identity)  # linear from 0
    stem, down = m.patch_embed, m.stages[1].downsample
    assert (stem.kernel_size, stem.stride, stem.padding, stem.out_channels) == ((7, 7), (4, 4), (2, 2), 96)
    assert (down.kernel_size, down.stride, down.padding, down.out_channels) == ((3, 3), (2, 2), (1, 1), 192)
    assert isinstance(m.stages[0].downsample, nn.Identity) and isinstance(m.norm, nn.Identity)
    for size, scale in (('s12', 1e-5), ('s24', 1e-5), ('s36', 1e-6), ('m36', 1e-6)):
        small = timm.create_model(f'poolformerv1_{size}', depths=(1, 1, 1, 1), dims=(4, 4, 4, 4))
        assert torch.equal(small.stages[3].blocks[0].layer_scale2.gamma.detach(), torch.full((4,), scale)), size
    s12 = timm.create_model('poolformerv1_s12', **NARROW)
    mlp = s12.stages[3].blocks[0].mlp.fc1
    assert mlp.bias.abs().max() == 0 and 0.01 < mlp.weight.std() < 0.03  # the released init of the MLP
    assert s12.pretrained_cfg['crop_pct'] == 0.9
    assert timm.create_model('poolformerv1_m36', device='meta').pretrained_cfg['crop_pct'] == 0.95


def test_any_input_size_features_and_intermediates():
    model = timm.create_model('poolformerv1_s12', **NARROW).eval()
    x = torch.randn(1, 3, 45, 70)
    sides = [(11, 17), (6, 9), (3, 5), (2, 3)]
    features = timm.create_model('poolformerv1_s12', features_only=True, **NARROW).eval()
    features.model.load_state_dict(model.state_dict(), strict=False)  # pruned: no head
    with torch.no_grad():
        out = model(x)
        final, inter = model.forward_intermediates(x)
        outs = features(x)
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    assert [tuple(t.shape) for t in inter] == [(1, c, *s) for c, s in zip(NARROW['dims'], sides)]
    torch.testing.assert_close(final, inter[-1])
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert features.feature_info.channels() == list(NARROW['dims'])
    for a, b in zip(outs, inter):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(early[0], inter[1])
    model.prune_intermediate_layers(indices=[1])  # the head's norm (sized for the last stage) goes with stages 2-3
    assert len(model.stages) == 2 and model.num_features == 16 and isinstance(model.head.norm, nn.Identity)
    with torch.no_grad():  # timm's pruning: no pooling, no classifier
        torch.testing.assert_close(model(x), inter[1])


def test_torchscript_and_fx():
    x = torch.randn(1, 3, 50, 66)
    for head_norm in ('pooled', 'map'):
        model = timm.create_model('poolformerv1_s12', head_norm=head_norm, **NARROW).eval()
        with torch.no_grad():
            want = model(x)
            torch.testing.assert_close(torch.jit.script(model)(x), want)
    with torch.no_grad():
        got = create_feature_extractor(model, {'stages.1': 's1', 'head': 'out'})(x)
    torch.testing.assert_close(got['out'], want)
    assert got['s1'].shape == (1, 16, 6, 8)
    features = timm.create_model('poolformerv1_s12', features_only=True, **NARROW).eval()
    with torch.no_grad():
        for a, b in zip(torch.jit.script(features)(x), features(x)):
            torch.testing.assert_close(a, b)


def test_model_api_and_errors():
    from timm.models._manipulate import group_parameters

    model = timm.create_model('poolformerv1_s12', device='meta')
    assert model.no_weight_decay() == set()
    assert len(group_parameters(model, model.group_matcher(coarse=True))) == 6  # stem, 4 stages, head
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7 and model.head.norm.normalized_shape == (512,)
    model.reset_classifier(0, '')
    with pytest.raises(ValueError, match='head_norm'):
        timm.create_model('poolformerv1_s12', device='meta', head_norm='both')
    with pytest.raises(ValueError, match='dims'):
        timm.create_model('poolformerv1_s12', device='meta', dims=(64, 128, 320))
    with pytest.raises(ValueError, match='pool_size'):
        timm.create_model('poolformerv1_s12', device='meta', pool_size=4)
    with pytest.raises(RuntimeError, match='No pretrained weights'):
        timm.create_model('poolformerv1_s12', pretrained=True)
