"""Registry-driven tests over every timm model that visattn registers, and the gating backbones' figures."""

import json
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

import visattn

MODELS = visattn.list_models()
# the deepest variants repeat their depth-50 sibling's blocks: run with -m slow
DEEP = ('resnet101_', 'resnet152_', 'epsanet101', 'sknet101')
DEEP += ('nat_tiny', 'nat_small', 'nat_base', 'dinat_tiny', 'dinat_small', 'dinat_base')  # NAT/DiNAT: *_mini by default
DEEP += ('dat_small', 'dat_base')  # DAT: dat_tiny by default
DEEP += ('gfnet_xs', 'gfnet_s', 'gfnet_b', 'gfnet_h_s', 'gfnet_h_b')  # GFNet: gfnet_ti, gfnet_h_ti by default
DEEP += ('shiftvit_s', 'shiftvit_b', 'smlpnet_s', 'smlpnet_b')  # shiftvit_t_light, smlpnet_t by default
DEEP += ('resnet50_acnet', 'resnet18_dbb', 'resnet50_dbb')  # re-parameterisable ResNets: resnet18_acnet by default
DEEP += ('s2mlp_wide', 's2mlpv2_medium')  # S²-MLP(v2): s2mlp_deep, s2mlpv2_small by default (afnonet_ti: one variant)
DEEP += ('swin_s', 'swin_b')  # Swin: swin_t and swinv2_t by default
DEEP += ('poolformerv1_s24', 'poolformerv1_s36', 'poolformerv1_m')  # PoolFormer: poolformerv1_s12 by default
DEEP += ('mobilevit_x_small', 'mobilevit_small')  # MobileViT: mobilevit_xx_small by default
DEEP += ('volo_d2', 'volo_d3', 'volo_d4', 'volo_d5')  # VOLO: volo_d1 by default
DEEP_NAMES = ('shiftvit_t',)  # exact names, where a prefix would also catch the smallest variant (shiftvit_t_light)
MODEL_PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n.startswith(DEEP) or n in DEEP_NAMES else n
                for n in MODELS]


def _small_kwargs(name: str) -> dict:
    return dict(img_size=64, depth=3) if name.startswith('vit') else {}


@pytest.fixture(scope='module')
def timm_only_models() -> set[str]:
    code = 'import json, timm; print(json.dumps(timm.list_models()))'
    return set(json.loads(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                                         check=True).stdout))


def test_no_timm_name_is_overwritten(timm_only_models):
    assert MODELS, 'visattn registers no model'
    assert not set(MODELS) & timm_only_models
    assert set(MODELS) <= set(timm.list_models())


@pytest.mark.parametrize('name', MODEL_PARAMS)
def test_forward_backward_features(name):
    kw = _small_kwargs(name)
    model = timm.create_model(name, num_classes=5, **kw)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f'parameters without gradient: {missing[:5]}'
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert torch.allclose(model.forward_head(feats), model(x), atol=1e-5)
        assert model.forward_head(feats, pre_logits=True).shape[-1] == model.num_features
    model.reset_classifier(7)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
    assert model.pretrained_cfg['num_classes'] == 1000 and model.pretrained_cfg['architecture'] == name

    features = timm.create_model(name, features_only=True, **kw).eval()
    with torch.no_grad():
        outs = features(x)
    assert [o.shape[1] for o in outs] == features.feature_info.channels()
    if not name.startswith('vit'):
        # the map side is 64 / reduction, floored or ceiled where the reduction does not divide 64 (strides 7, 14)
        assert all(o.shape[-1] in (64 // r, -(-64 // r)) for o, r in zip(outs, features.feature_info.reduction()))


@pytest.mark.parametrize('name', ['resnet18_cbam', 'resnet50_bam', 'resnet50_sk'])
def test_grad_checkpointing_gives_same_gradients(name):
    model = timm.create_model(name, num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    model(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name, expected', [
    ('resnet50_se', 28_088_024), ('resnet50_cbam', 28_089_624), ('resnet50_bam', 25_915_099),
    ('resnet50_gc', 28_078_773), ('resnet50_eca', 25_557_032 + 3 * 5 + 4 * 5 + 6 * 5 + 3 * 7),
])
def test_parameter_counts_match_references(name, expected):
    model = timm.create_model(name, device='meta')
    assert sum(p.numel() for p in model.parameters()) == expected


def test_sknet50_parameter_count_near_paper():
    n = sum(p.numel() for p in timm.create_model('sknet50', device='meta').parameters())
    assert abs(n - 27.5e6) / 27.5e6 < 0.01, n


def test_block_placement():
    gc = timm.create_model('resnet50_gc', device='meta')
    assert gc.layer1[0].se is None and all(b.se is not None for s in (gc.layer2, gc.layer3, gc.layer4) for b in s)
    bam = timm.create_model('resnet50_bam', device='meta')
    names = [type(s[-1]).__name__ for s in (bam.layer1, bam.layer2, bam.layer3, bam.layer4)]
    assert names == ['BottleneckAttnModule'] * 3 + ['Bottleneck']
    assert [s[-1].channels for s in (bam.layer1, bam.layer2, bam.layer3)] == [256, 512, 1024]
    sk = timm.create_model('sknet50', device='meta')
    assert sk.layer1[0].conv2.branches[0][0].groups == 32 and sk.layer4[0].conv2.branches[1][0].dilation == (2, 2)


def test_timm_seresnet_weights_load_into_resnet50_se():
    """Same block placement and names as timm's SE-ResNet-50: its weights load strictly, outputs agree."""
    theirs = timm.create_model('seresnet50').eval()
    ours = timm.create_model('resnet50_se').eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_plain_resnet_weights_load_leaving_only_attention_fresh():
    plain = timm.create_model('resnet50', device='meta').state_dict()
    result = timm.create_model('resnet50_cbam', device='meta').load_state_dict(plain, strict=False, assign=True)
    assert not result.unexpected_keys
    assert result.missing_keys and all('.se.' in k for k in result.missing_keys)


def test_pretrained_without_weights_is_an_error():
    with pytest.raises(RuntimeError, match="No pretrained weights are published for 'resnet50_cbam'"):
        timm.create_model('resnet50_cbam', pretrained=True)


def test_pretrained_from_a_local_file(tmp_path):
    source = timm.create_model('resnet18_eca', num_classes=1000)
    path = tmp_path / 'resnet18_eca.safetensors'
    save_file(source.state_dict(), str(path))
    loaded = timm.create_model('resnet18_eca', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for (k, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_output_stride_8_for_segmentation():
    model = timm.create_model('resnet18_cbam', features_only=True, output_stride=8, out_indices=(1, 2, 3, 4))
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[-1] for o in outs] == [16, 8, 8, 8]


@pytest.mark.parametrize('name,block', [('resnet18_cbam', 'BasicBlock'), ('resnet50_cbam', 'Bottleneck')])
@pytest.mark.parametrize('drop_path', [0.0, 0.1])
def test_add_fused_blocks_match_timm_blocks(name, block, drop_path):
    """The CBAM ResNets' blocks fuse the residual addition into CBAM's last product; outputs and gradients are
    those of timm's own blocks with the same weights (drop path takes timm's route)."""
    from timm.models import resnet as timm_resnet

    from visattn.models import AttnResNet

    ours = timm.create_model(name, num_classes=5, drop_path_rate=drop_path)
    assert type(ours.layer1[0]).__name__ == f'AddFused{block}'
    layers = tuple(len(s) for s in (ours.layer1, ours.layer2, ours.layer3, ours.layer4))
    theirs = AttnResNet(getattr(timm_resnet, block), layers, attn_layer=visattn.get_attn('cbam'), num_classes=5,
                        drop_path_rate=drop_path)
    with torch.no_grad():  # non-trivial BN statistics and attention weights
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name_, b in ours.named_buffers():
            if name_.endswith('running_var'):
                b.uniform_(0.5, 1.5)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 64, 64)
    ours.eval(), theirs.eval()
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), theirs(x))
    ours.train(), theirs.train()
    torch.manual_seed(0)
    out = ours(x)
    torch.manual_seed(0)
    ref = theirs(x)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    out.backward(g), ref.backward(g)
    for (n, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
