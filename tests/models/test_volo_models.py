"""VOLO (volo_d1 ... volo_d5): parameters equal timm's and the paper's, timm's state dicts load and give timm's outputs
and gradients in float64 (narrow widths at the full depths by default, the full VOLO-D1 in the slow run), the
channels-last outlook entry, any input size, the token-labeling inference rule, features, pruning, TorchScript / fx."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models._features_fx import create_feature_extractor
from timm.models.volo import OutlookAttention

import visattn  # noqa: F401  (registers the models)
from visattn.layers import OutlookAttn
from visattn.models.volo import OutlookAttnNHWC, checkpoint_filter_fn

NAMES = ('volo_d1', 'volo_d2', 'volo_d3', 'volo_d4', 'volo_d5')
PAPER_M = {'volo_d1': 27, 'volo_d2': 59, 'volo_d3': 86, 'volo_d4': 193, 'volo_d5': 296}  # arXiv:2106.13112
# VOLO-D5's 296M holds at its fine-tuned sizes (448², 512²: a 28² or 32² position embedding); at 224² it is 295.46M
PAPER_SIZE = {'volo_d5': 512}
NARROW = dict(embed_dims=(32, 64, 64, 64), num_heads=(2, 4, 4, 4), stem_hidden_dim=16)  # D1's depths [4, 4, 8, 2]
TINY = dict(layers=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32), num_heads=(2, 2, 2, 2), stem_hidden_dim=8,
            num_classes=10)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _randomized_timm(**kw) -> torch.nn.Module:
    """timm's VOLO-D1 (``VOLO`` with D1's depths, widths from ``kw``) with every parameter and BatchNorm statistic
    random (norm weights around 1)."""
    from timm.models.volo import VOLO as TimmVOLO

    args = dict(layers=(4, 4, 8, 2), embed_dims=(192, 384, 384, 384), num_heads=(6, 12, 12, 12))
    model = TimmVOLO(**{**args, **kw}).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            unit = ('norm' in n or 'conv.1' in n or 'conv.4' in n or 'conv.7' in n) and n.endswith('weight')
            p.copy_(torch.randn_like(p) * (0.2 if unit else 0.05) + (1. if unit else 0.))
        for n, b in model.named_buffers():
            if n.endswith('running_var'):
                b.uniform_(0.5, 1.5)
            elif n.endswith('running_mean'):
                b.normal_(0, 0.1)
    return model


def test_parameter_counts_match_the_papers():
    for name in NAMES:
        n = _count(timm.create_model(name, img_size=PAPER_SIZE.get(name, 224), device='meta'))
        assert round(n / 1e6) == PAPER_M[name], (name, n)
    assert _count(timm.create_model('volo_d5', device='meta')) == 295_455_584


@pytest.mark.parametrize('name', ['volo_d1', 'volo_d2', pytest.param('volo_d3', marks=pytest.mark.slow),
                                  pytest.param('volo_d4', marks=pytest.mark.slow),
                                  pytest.param('volo_d5', marks=pytest.mark.slow)])
def test_parameter_counts_equal_timms(name):
    assert _count(timm.create_model(name, device='meta')) == _count(timm.create_model(f'{name}_224', device='meta'))


def test_timm_state_dict_layout_maps_onto_ours():
    """timm's VOLO-D2 (meta): every key maps to one of ours with its shape; the released wrapper and prefixes too."""
    ref = timm.create_model('volo_d2_224', device='meta')
    ours = timm.create_model('volo_d2', device='meta')
    mapped = checkpoint_filter_fn(ref.state_dict(), ours)
    own = ours.state_dict()
    assert set(mapped) == set(own)
    assert all(mapped[k].shape == own[k].shape for k in own)
    released = {'state_dict': {'module.' + k: v for k, v in ref.state_dict().items()}}
    assert set(checkpoint_filter_fn(released, ours)) == set(own)
    assert set(checkpoint_filter_fn(own, ours)) == set(own)  # ours passes through


@pytest.mark.parametrize('size', [224, 96])
def test_timm_state_dict_loads_and_computes_timms_outputs_and_gradients(size, tmp_path):
    ref = _randomized_timm(img_size=size, **NARROW)
    path = tmp_path / 'volo.pth'
    torch.save(ref.state_dict(), path)
    ours = timm.create_model('volo_d1', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), img_size=size,
                             **NARROW).double().eval()
    ref = ref.double()
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), rtol=0, atol=1e-8)
    if size == 224:
        return  # the gradients at the smaller size
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
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


@pytest.mark.slow
def test_full_volo_d1_computes_timms_outputs(tmp_path):
    ref = _randomized_timm()
    path = tmp_path / 'volo_d1.pth'
    torch.save(ref.state_dict(), path)
    ours = timm.create_model('volo_d1', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).double().eval()
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref.double()(x), rtol=0, atol=1e-8)


class _TimmOutlook(OutlookAttention):
    pass


@pytest.mark.parametrize('hw, stride', [((7, 9), 2), ((6, 8), 2), ((5, 4), 1), ((1, 1), 2)])
def test_outlook_channels_last_entry(hw, stride):
    """`OutlookAttn.forward_nhwc` (through `OutlookAttnNHWC`) is `forward` on the permuted map and timm's
    ``OutlookAttention`` (channels-last) with the same weights: outputs and gradients, float64."""
    torch.manual_seed(0)
    ours = OutlookAttnNHWC(24, num_heads=3, stride=stride, qkv_bias=True, dtype=torch.float64)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
    nchw = OutlookAttn(24, num_heads=3, stride=stride, qkv_bias=True, dtype=torch.float64)
    theirs = _TimmOutlook(24, 3, stride=stride, qkv_bias=True, dtype=torch.float64)
    nchw.load_state_dict(ours.state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, *hw, 24, dtype=torch.float64, requires_grad=True)
    y = ours(x)
    torch.testing.assert_close(y, theirs(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(y, nchw(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), rtol=0, atol=1e-12)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *ours.parameters()], g)
    want = torch.autograd.grad(theirs(x), [x, *theirs.parameters()], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match='forward_nhwc'):
        ours(torch.randn(2, 24, 5, 5, dtype=torch.float64))


def test_any_input_size_position_embedding_and_features():
    model = timm.create_model('volo_d1', **TINY).eval()
    assert model.stages[1].pos_embed.shape == (1, 14, 14, 32)
    with torch.no_grad():
        for h, w in ((80, 112), (100, 90)):  # 10×14 and 5×7 maps; 100×90: 12×11 and 6×5 (the convs floor)
            x = torch.randn(1, 3, h, w)
            out = model(x)
            final, inter = model.forward_intermediates(x)
            sh, sw = (h + 1) // 2 // 4, (w + 1) // 2 // 4  # the stride-2 7×7 conv rounds up, the 4×4 conv floors
            gh, gw = sh // 2, sw // 2
            assert out.shape == (1, 10) and torch.isfinite(out).all()
            assert [tuple(t.shape) for t in inter] == [(1, 16, sh, sw)] + [(1, 32, gh, gw)] * 3
            torch.testing.assert_close(final, model.forward_features(x))
            assert final.shape == (1, 1 + gh * gw, 32)
        # the resize at forward is the checkpoint's resize: a model made for 80×112 with the loaded embedding
        sized = timm.create_model('volo_d1', img_size=(80, 112), **TINY).eval()
        sized.load_state_dict(checkpoint_filter_fn(model.state_dict(), sized))
        assert sized.stages[1].pos_embed.shape == (1, 5, 7, 32)
        want = F.interpolate(model.stages[1].pos_embed.permute(0, 3, 1, 2), size=(5, 7), mode='bicubic',
                             align_corners=False).permute(0, 2, 3, 1)
        torch.testing.assert_close(sized.stages[1].pos_embed, want)
        x = torch.randn(2, 3, 80, 112)
        torch.testing.assert_close(sized(x), model(x))
        features = timm.create_model('volo_d1', features_only=True, **TINY).eval()
        features.model.load_state_dict(model.state_dict(), strict=False)  # pruned: no head
        outs = features(x)
    assert features.feature_info.reduction() == [8, 16, 16, 16]
    assert features.feature_info.channels() == [16, 32, 32, 32]
    with torch.no_grad():
        for a, b in zip(outs, model.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(a, b)


def test_token_labeling_inference_rule():
    """logits = head(class token) + 0.5 · max over the patch tokens of aux_head(token), in eval and training."""
    model = timm.create_model('volo_d1', **TINY)
    x = torch.randn(2, 3, 64, 64)
    for train in (False, True):
        model.train(train)
        torch.manual_seed(0)
        with torch.no_grad():
            feats = model.forward_features(x)
            want = model.head(feats[:, 0]) + 0.5 * model.aux_head(feats[:, 1:]).amax(1)
            torch.testing.assert_close(model.forward_head(feats), want)
            torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats[:, 0])
    avg = timm.create_model('volo_d1', global_pool='avg', use_aux_head=False, **TINY).eval()
    with torch.no_grad():
        feats = avg.forward_features(x)
        torch.testing.assert_close(avg(x), avg.head(feats.mean(1)))
    assert avg.aux_head is None
    plain = timm.create_model('volo_d1', post_layers=(), global_pool='avg', **TINY).eval()
    with torch.no_grad():
        feats = plain.forward_features(x)  # no class token: the aux head sees every token
        assert feats.shape == (2, 16, 32)
        torch.testing.assert_close(plain(x), plain.head(feats.mean(1)) + 0.5 * plain.aux_head(feats).amax(1))


def test_structure_of_the_papers_models():
    d1 = timm.create_model('volo_d1', device='meta')
    assert [len(s.blocks) for s in d1.stages] == [4, 4, 8, 2] and len(d1.post_network) == 2
    assert all(type(b.attn) is OutlookAttnNHWC and b.attn.stride == 2 and b.attn.kernel_size == 3
               and b.attn.num_heads == 6 for b in d1.stages[0].blocks)
    assert d1.stages[1].downsample.proj.stride == (2, 2) and d1.stages[1].blocks[0].attn.num_heads == 12
    assert d1.patch_embed.conv[0].stride == (2, 2) and d1.patch_embed.proj.stride == (4, 4)
    assert d1.stages[3].blocks[0].mlp.fc1.out_features == 3 * 384
    assert d1.pretrained_cfg['input_size'] == (3, 224, 224)
    d5 = timm.create_model('volo_d5', device='meta')
    assert [len(s.blocks) for s in d5.stages] == [12, 12, 20, 4] and d5.patch_embed.conv[0].out_channels == 128
    assert d5.stages[2].blocks[0].mlp.fc1.out_features == 4 * 768 and d5.num_features == 768
    rated = timm.create_model('volo_d1', drop_path_rate=0.1, device='meta')
    assert all(isinstance(b.drop_path1, torch.nn.Identity) for b in rated.stages[0].blocks)  # none in outlookers
    assert abs(rated.stages[1].blocks[0].drop_path1.drop_prob - 0.1 * 4 / 17) < 1e-12  # released: over all layers
    assert abs(rated.stages[3].blocks[1].drop_path1.drop_prob - 0.1) < 1e-12


def test_pruning_drops_the_class_token_and_keeps_the_taps():
    model = timm.create_model('volo_d1', **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
        for i in (0, 2):
            pruned = copy.deepcopy(model)
            take = pruned.prune_intermediate_layers([i])
            assert pruned.cls_token is None and pruned.post_network is None and pruned.aux_head is None
            torch.testing.assert_close(pruned.forward_intermediates(x, indices=take, intermediates_only=True)[0],
                                       taps[i])
        kept = copy.deepcopy(model)
        kept.prune_intermediate_layers([3], prune_head=False)
        torch.testing.assert_close(kept(x), model(x))
    with pytest.raises(ValueError, match='class token'):
        pruned.reset_classifier(5, 'token')
    pruned.reset_classifier(5, 'avg')
    assert pruned(x).shape == (1, 5) and pruned.aux_head is None


def test_torchscript_and_fx():
    model = timm.create_model('volo_d1', **TINY).eval()
    x = torch.randn(1, 3, 80, 96)  # position embedding resized
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), want)
        got = create_feature_extractor(model, {'stages.0': 's0', 'head': 'out'})(x)
        assert got['s0'].shape == (1, 10, 12, 16)
        torch.testing.assert_close(got['out'], model.head(model.forward_features(x)[:, 0]))  # before the aux term


@pytest.mark.slow
def test_features_only_scripts():
    x = torch.randn(1, 3, 80, 96)
    features = timm.create_model('volo_d1', features_only=True, **TINY).eval()
    with torch.no_grad():
        for a, b in zip(torch.jit.script(features)(x), features(x)):
            torch.testing.assert_close(a, b)


def test_model_api_and_errors():
    model = timm.create_model('volo_d1', device='meta')
    assert model.no_weight_decay() == {'cls_token', 'stages.1.pos_embed'}
    from timm.models._manipulate import group_parameters
    assert len(group_parameters(model, model.group_matcher(coarse=True))) > 4
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7 and model.aux_head.out_features == 7
    bad = [(dict(num_heads=(6, 12, 12)), 'num_heads'), (dict(downsamples=(False, False, False, True)), 'downsamples'),
           (dict(embed_dims=(192, 384, 256, 384)), 'embed_dims'), (dict(patch_size=6), 'patch_size'),
           (dict(global_pool='max'), 'global_pool'), (dict(post_layers=('sa',)), 'post_layers'),
           (dict(post_layers=()), 'token')]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            timm.create_model('volo_d1', device='meta', **kw)
