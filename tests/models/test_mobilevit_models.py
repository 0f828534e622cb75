"""MobileViT backbones: parameter counts against timm's models and the paper, timm's state dicts (random weights)
loading through ``checkpoint_filter_fn`` and computing timm's outputs, feature maps and input gradients in float64,
sizes that are not multiples of 32 (where the blocks resize, as timm's), features, TorchScript and torch.fx.

timm's ``mobilevit_xxs / xs / s`` (ByobNet with its own ``BottleneckBlock`` and ``MobileVitBlock``) are the
independent reference: none of their code is ours. The default run checks MobileViT-XXS at the paper's 256²; XS
and S are the slow run."""

import pytest
import timm
import torch
from timm.models._features_fx import create_feature_extractor

import visattn  # noqa: F401  (registers the models)
from visattn.layers import MobileVitBlock
from visattn.models.mobilevit import InvertedResidual, MobileViT, checkpoint_filter_fn

TIMM = {'mobilevit_xx_small': 'mobilevit_xxs', 'mobilevit_x_small': 'mobilevit_xs', 'mobilevit_small': 'mobilevit_s'}
PAPER_M = {'mobilevit_xx_small': 1.3, 'mobilevit_x_small': 2.3, 'mobilevit_small': 5.6}  # arXiv:2110.02178 Table 4


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _randomized_timm(name: str) -> torch.nn.Module:
    """timm's model in eval mode with every parameter and BN statistic random (norm weights around 1), drawn in
    float32 so that a float32 copy of it is exact."""
    torch.manual_seed(0)
    model = timm.create_model(TIMM[name]).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            unit = ('bn' in n or 'norm' in n) and n.endswith('weight')
            p.copy_(torch.randn_like(p) * (0.2 if unit else 0.1) + (1. if unit else 0.))
        for n, b in model.named_buffers():
            if n.endswith('running_mean'):
                b.copy_(torch.randn_like(b) * 0.1)
            elif n.endswith('running_var'):
                b.copy_(torch.rand_like(b) + 0.5)
    return model


def _pair(name: str, path, **kw) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, timm's) in float64 eval mode, ours loaded from timm's state dict saved at ``path``."""
    ref = _randomized_timm(name)
    torch.save(ref.state_dict(), path)
    ours = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kw)
    return ours.double().eval(), ref.double()


def test_parameter_counts_equal_timms_and_match_the_paper():
    for name, ref in TIMM.items():
        n = _count(timm.create_model(name, device='meta'))
        assert n == _count(timm.create_model(ref, device='meta')), name
        assert round(n / 1e6, 1) == PAPER_M[name], (name, n)


def test_layout_is_the_papers_table_4():
    model = timm.create_model('mobilevit_xx_small', device='meta')
    assert model.pretrained_cfg['input_size'] == (3, 256, 256)
    assert model.stem.conv.stride == (2, 2) and model.stem.conv.out_channels == 16
    mv2 = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert len(mv2) == 7 and all(m.conv1_1x1.conv.out_channels == 2 * m.conv1_1x1.conv.in_channels for m in mv2)
    assert [m.has_skip for m in mv2] == [True, False, True, True, False, False, False]  # 16->16, then ↓2 and 24->24
    blocks = [m for m in model.modules() if isinstance(m, MobileVitBlock)]
    assert [(b.channels, b.transformer_dim, len(b.transformer), b.patch_size) for b in blocks] == [
        (48, 64, 2, 2), (64, 80, 4, 2), (80, 96, 3, 2)]
    assert all(b.transformer[0].mlp.fc1.out_features == 2 * b.transformer_dim for b in blocks)
    assert model.stages[4].final_conv.conv.out_channels == model.num_features == 320
    small = timm.create_model('mobilevit_small', device='meta')
    assert all(m.conv1_1x1.conv.out_channels == 4 * m.conv1_1x1.conv.in_channels
               for m in small.modules() if isinstance(m, InvertedResidual))
    assert [b.transformer_dim for b in small.modules() if isinstance(b, MobileVitBlock)] == [144, 192, 240]


@pytest.fixture(scope='module')
def xxs(tmp_path_factory) -> tuple[torch.nn.Module, torch.nn.Module]:
    return _pair('mobilevit_xx_small', tmp_path_factory.mktemp('mobilevit') / 'xxs.pth')


def test_timm_state_dict_loads_and_computes_timms_features(xxs):
    ours, ref = xxs
    x = torch.randn(1, 3, 256, 256, dtype=torch.float64)
    with torch.no_grad():
        got, feats = ours.forward_intermediates(x)
        want, ref_feats = ref.forward_intermediates(x)
    assert want.shape == (1, 320, 8, 8) and want.std() > 0.1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-8)
    assert [f.shape[-1] for f in feats] == [128, 64, 32, 16, 8]
    for a, b in zip(feats, ref_feats, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-8)


def test_timm_state_dict_computes_timms_logits_and_input_gradient(xxs):
    ours, ref = xxs
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = ours(xa), ref(xb)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-8)
    w = torch.randn_like(out_a)
    (out_a * w).sum().backward()
    (out_b * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-8)


def test_sizes_that_are_not_multiples_of_32_resize_as_timms(xxs):
    """96×80: maps 6×5 at stride 16 and 3×3 at stride 32, which the MobileViT blocks resize to 6×6 / 4×4 and back."""
    ours, ref = xxs
    x = torch.randn(1, 3, 96, 80, dtype=torch.float64)
    with torch.no_grad():
        out = ours.forward_features(x)
        assert out.shape == (1, 320, 3, 3)
        torch.testing.assert_close(out, ref.forward_features(x), rtol=0, atol=1e-8)
        assert ours(torch.randn(1, 3, 1, 1, dtype=torch.float64)).shape == (1, 1000)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['mobilevit_x_small', 'mobilevit_small'])
def test_larger_variants_compute_timms_outputs(name, tmp_path):
    ours, ref = _pair(name, tmp_path / f'{name}.pth')
    x = torch.randn(2, 3, 256, 256, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-8)


def test_features_only_gives_nchw_maps_at_strides_2_to_32():
    model = timm.create_model('mobilevit_xx_small', features_only=True).eval()
    assert model.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert model.feature_info.channels() == [16, 24, 48, 64, 320]
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(2, 16, 32, 48), (2, 24, 16, 24), (2, 48, 8, 12), (2, 64, 4, 6),
                                              (2, 320, 2, 3)]
    picked = timm.create_model('mobilevit_xx_small', features_only=True, out_indices=(2, 3))
    assert picked.feature_info.channels() == [48, 64]


def test_filter_passes_our_layout_and_unwraps():
    model = timm.create_model('mobilevit_xx_small', num_classes=10)
    own = model.state_dict()
    assert checkpoint_filter_fn(own, model) is own
    ref = timm.create_model('mobilevit_xxs', num_classes=10).state_dict()
    mapped = checkpoint_filter_fn({'state_dict': ref}, model)
    assert set(mapped) == set(own)
    assert 'stages.4.final_conv.conv.weight' in mapped and 'stages.1.downsample.conv2_kxk.conv.weight' in mapped


def test_traces():
    model = timm.create_model('mobilevit_xx_small', num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        traced = create_feature_extractor(model, return_nodes=['stages.2', 'head'])(x)
    assert traced['stages.2'].shape == (1, 48, 8, 8)
    torch.testing.assert_close(traced['head'], want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
def test_scripts():
    model = timm.create_model('mobilevit_xx_small', num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_grad_checkpointing_gives_same_gradients():
    model = MobileViT(widths=(8, 8, 16, 16, 16), transformer_dims=(16, 16, 16), final_channels=32, stem_channels=8,
                      num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    model(x).sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], msg=n)


@pytest.mark.parametrize('kwargs,arg', [
    (dict(widths=(16, 24, 48, 64)), 'widths'),
    (dict(transformer_dims=(64, 80)), 'transformer_dims'),
    (dict(transformer_depths=(2, 4)), 'transformer_depths'),
    (dict(mv2_depths=(1,)), 'mv2_depths'),
    (dict(final_channels=0), 'final_channels'),
    (dict(drop_path_rate=1.5), 'drop_path_rate'),
])
def test_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        MobileViT(**kwargs, device='meta')
