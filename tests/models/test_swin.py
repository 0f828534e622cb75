"""Swin / Swin V2 backbones: parameter counts against timm's models and the papers, timm's Swin and Swin V2 state
dicts (random weights) loading through ``checkpoint_filter_fn`` and computing timm's outputs and gradients in float64,
the released checkpoint layout, patch merging against the paper's 2×2 concatenation, the block structure, any input
size, features, TorchScript and torch.fx.

timm's models are the independent reference: their window attention, shift masks, patch merging and blocks are timm's
code, not ours. The default run uses the models at narrow widths (C = 16, one or two heads) at the paper's input sizes
(224², window 7; 256², window 8), so that every stage, shift and mask of the full models is exercised; the full widths
are the slow run."""

import re

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models._features_fx import create_feature_extractor

import visattn  # noqa: F401  (registers the models)
from visattn.layers import WindowAttn, WindowAttnV2
from visattn.models.swin import PatchMerging, checkpoint_filter_fn

TIMM = {'swin_t': 'swin_tiny_patch4_window7_224', 'swin_s': 'swin_small_patch4_window7_224',
        'swin_b': 'swin_base_patch4_window7_224', 'swinv2_t': 'swinv2_tiny_window8_256'}
SIZE = {'swin_t': 224, 'swinv2_t': 256}
# Swin (arXiv:2103.14030) Table 1; SwinV2-T 256² window 8: the released MODELHUB.md table
PAPER_M = {'swin_t': 28, 'swin_s': 50, 'swin_b': 88, 'swinv2_t': 28}
NARROW = dict(embed_dim=16, num_heads=(1, 2, 2, 4))
TINY = dict(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), num_classes=10)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _randomized_timm(name: str, **kw) -> torch.nn.Module:
    """timm's model with every parameter random (norm weights around 1; Swin V2's zero-initialised post-norms would
    otherwise make every block the identity), drawn in float32 so that a float32 copy of it is exact."""
    model = timm.create_model(TIMM[name], **kw).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            unit = 'norm' in n and n.endswith('weight')
            p.copy_(torch.randn_like(p) * (0.2 if unit else 0.05) + (1. if unit else 0.))
    return model


def test_parameter_counts_equal_timms_and_match_the_papers():
    for name, ref in TIMM.items():
        n = _count(timm.create_model(name, device='meta'))
        assert n == _count(timm.create_model(ref, device='meta')), name
        assert round(n / 1e6) == PAPER_M[name], (name, n)


def _check_against_timm(name: str, kw: dict, path) -> None:
    ref = _randomized_timm(name, **kw)
    torch.save(ref.state_dict(), path)
    ref = ref.double()
    ours = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kw)
    ours = ours.double().eval()
    x = torch.randn(1, 3, SIZE[name], SIZE[name], dtype=torch.float64)
    with torch.no_grad():  # the fused attention path
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), rtol=0, atol=1e-8)
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-8)
    # with autograd (the matmul path of the window blocks): the logits, the input gradient and every parameter's
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = torch.randn(1, ours.num_classes, dtype=torch.float64)
    out_a, out_b = ours(xa), ref(xb)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-8)
    (out_a * w).sum().backward()
    (out_b * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-8)
    want = checkpoint_filter_fn({n: p.grad for n, p in ref.named_parameters()}, ours)
    got = {n: p.grad for n, p in ours.named_parameters()}
    assert set(got) == set(want)
    for n, g in got.items():
        torch.testing.assert_close(g, want[n], rtol=0, atol=1e-8, msg=n)


@pytest.mark.parametrize('name', ['swin_t', 'swinv2_t'])
def test_timm_state_dict_loads_and_computes_timms_outputs_and_gradients(name, tmp_path):
    _check_against_timm(name, NARROW, tmp_path / f'{name}.pth')


@pytest.mark.slow
@pytest.mark.parametrize('name', ['swin_t', 'swinv2_t'])
def test_full_width_timm_state_dict_computes_timms_outputs(name, tmp_path):
    ref = _randomized_timm(name)
    path = tmp_path / f'{name}.pth'
    torch.save(ref.state_dict(), path)
    ref = ref.double()
    ours = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).double().eval()
    x = torch.randn(2, 3, SIZE[name], SIZE[name], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-8)


def _released_layout(state_dict: dict) -> dict:
    """timm's keys -> the released checkpoint's: the patch merging closes stage i, ``head`` is the classifier, and
    the buffers the released code saves."""
    out = {}
    for key, value in state_dict.items():
        if m := re.match(r'layers\.(\d+)\.downsample\.(.*)', key):
            key = f'layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}'
        elif key.startswith('head.fc.'):
            key = 'head.' + key[len('head.fc.'):]
        out[key] = value
        if key.endswith('attn.proj.weight'):
            out[key.replace('proj.weight', 'relative_position_index')] = torch.zeros(49, 49, dtype=torch.long)
            out[key.replace('attn.proj.weight', 'attn_mask')] = torch.zeros(4, 49, 49)
    return out


def test_released_checkpoint_layout_maps_and_tables_resize():
    ref = _randomized_timm('swin_t', **TINY)
    ours = timm.create_model('swin_t', **TINY)
    want = checkpoint_filter_fn(ref.state_dict(), ours)
    assert set(want) == set(ours.state_dict())
    released = _released_layout(ref.state_dict())
    assert 'layers.0.downsample.reduction.weight' in released and 'head.weight' in released
    got = checkpoint_filter_fn({'model': released}, ours)
    assert set(got) == set(want)
    for key, value in got.items():
        assert torch.equal(value, want[key]), key
    ours.load_state_dict(got, strict=True)
    assert set(checkpoint_filter_fn(ours.state_dict(), ours)) == set(ours.state_dict())  # ours passes through
    # a checkpoint of window 7 into a model of window 12: the tables are resized to (2·12 - 1)²
    big = timm.create_model('swin_t', window_size=12, **TINY)
    mapped = checkpoint_filter_fn(released, big)
    assert mapped['stages.0.blocks.1.attn.relative_position_bias_table'].shape == (23 * 23, 1)
    big.load_state_dict(mapped, strict=True)


@pytest.mark.parametrize('post_norm', [False, True])
def test_patch_merging_is_the_papers_2x2_concatenation(post_norm):
    merge = PatchMerging(6, post_norm=post_norm, dtype=torch.float64)
    with torch.no_grad():
        for p in merge.parameters():
            p.normal_()
    x = torch.randn(2, 7, 9, 6, dtype=torch.float64, requires_grad=True)  # odd sides: zero-padded to 8×10
    xp = torch.zeros(2, 8, 10, 6, dtype=torch.float64)
    xp[:, :7, :9] = x
    pieces = torch.cat([xp[:, 0::2, 0::2], xp[:, 1::2, 0::2], xp[:, 0::2, 1::2], xp[:, 1::2, 1::2]], -1)
    ln = merge.norm
    if post_norm:
        want = F.layer_norm(pieces @ merge.reduction.weight.t(), (12,), ln.weight, ln.bias)
    else:
        want = F.layer_norm(pieces, (24,), ln.weight, ln.bias) @ merge.reduction.weight.t()
    got = merge(x)
    assert got.shape == (2, 4, 5, 12)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0],
                               rtol=1e-12, atol=1e-12)


def test_structure_of_the_papers_models():
    m = timm.create_model('swin_s', device='meta')
    assert [len(s.blocks) for s in m.stages] == [2, 2, 18, 2]
    assert [s.blocks[0].attn.num_heads for s in m.stages] == [3, 6, 12, 24]
    assert [s.blocks[0].attn.channels for s in m.stages] == [96, 192, 384, 768]
    for s in m.stages:
        for j, b in enumerate(s.blocks):
            assert type(b.attn) is WindowAttn and not b.post_norm
            assert b.attn.window_size == 7 and b.attn.shift_size == (3 if j % 2 else 0)
            assert b.mlp.fc1.out_features == 4 * b.norm2.normalized_shape[0]
    assert abs(m.stages[3].blocks[1].drop_path.drop_prob - 0.3) < 1e-12
    assert isinstance(m.stages[0].blocks[0].drop_path, torch.nn.Identity)
    assert m.patch_embed.proj.kernel_size == (4, 4) and m.patch_embed.proj.stride == (4, 4)
    down = m.stages[1].downsample
    assert down.norm.normalized_shape == (384,) and down.reduction.bias is None and down.reduction.out_features == 192
    base = timm.create_model('swin_b', device='meta')
    assert [s.blocks[0].attn.num_heads for s in base.stages] == [4, 8, 16, 32] and base.num_features == 1024
    assert abs(base.stages[3].blocks[1].drop_path.drop_prob - 0.5) < 1e-12
    v2 = timm.create_model('swinv2_t', device='meta')
    assert v2.pretrained_cfg['input_size'] == (3, 256, 256)
    for s in v2.stages:
        for j, b in enumerate(s.blocks):
            assert type(b.attn) is WindowAttnV2 and b.post_norm
            assert b.attn.window_size == 8 and b.attn.shift_size == (4 if j % 2 else 0)
    assert v2.stages[1].downsample.norm.normalized_shape == (192,)  # Swin V2: the norm after the reduction
    assert abs(v2.stages[3].blocks[1].drop_path.drop_prob - 0.2) < 1e-12


def test_initialisation():
    v1 = timm.create_model('swin_t', **TINY)
    attn = v1.stages[0].blocks[1].attn
    assert attn.qkv.bias.abs().max() == 0 and 0.01 < attn.qkv.weight.std() < 0.03
    assert torch.all(v1.stages[0].blocks[0].norm1.weight == 1)
    v2 = timm.create_model('swinv2_t', **TINY)
    x = torch.randn(1, 32, 32, 8)
    blk = v2.stages[0].blocks[1]
    assert torch.all(blk.norm1.weight == 0) and torch.all(blk.norm2.bias == 0)
    torch.testing.assert_close(blk(x), x, rtol=0, atol=0)  # the zeroed post-norms: every block starts as identity
    assert torch.all(v2.stages[1].downsample.norm.weight == 1)


@pytest.mark.parametrize('name, pad_mode', [('swin_t', 'mask'), ('swinv2_t', 'zeros')])
def test_any_input_size_features_and_intermediates(name, pad_mode):
    model = timm.create_model(name, pad_mode=pad_mode, **TINY).eval()
    x = torch.randn(1, 3, 101, 130)  # padded to 104×132: maps 26×33, 13×17, 7×9, 4×5 (no side a multiple of M)
    sides = [(26, 33), (13, 17), (7, 9), (4, 5)]
    with torch.no_grad():
        out = model(x)
        final, inter = model.forward_intermediates(x)
        feats = model.forward_features(x)
        features = timm.create_model(name, features_only=True, pad_mode=pad_mode, **TINY).eval()
        features.model.load_state_dict(model.state_dict(), strict=False)  # pruned: no head
        outs = features(x)
        nhwc = model.forward_intermediates(x, indices=[1], output_fmt='NHWC', intermediates_only=True)
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    assert [tuple(t.shape) for t in inter] == [(1, 8 * 2 ** i, *s) for i, s in enumerate(sides)]
    assert feats.shape == (1, 4, 5, 64) and model.output_fmt == 'NHWC'
    torch.testing.assert_close(final, feats)
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats.mean((1, 2)))
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert features.feature_info.channels() == [8, 16, 32, 64]
    for a, b in zip(outs, inter):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(nhwc[0], inter[1].permute(0, 2, 3, 1))


def test_padding_modes_differ_only_off_the_multiples():
    model = timm.create_model('swin_t', window_size=2, **TINY).eval()
    zeros = timm.create_model('swin_t', window_size=2, pad_mode='zeros', **TINY).eval()
    zeros.load_state_dict(model.state_dict())
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)  # maps 16, 8, 4, 2: every one a multiple of the window, nothing is padded
        torch.testing.assert_close(model(x), zeros(x), rtol=0, atol=0)
        x = torch.randn(1, 3, 72, 72)  # maps 18, 9, 5, 3: padded keys masked or taking part
        assert (model(x) - zeros(x)).abs().max() > 1e-4


def test_torchscript_and_fx():
    x = torch.randn(1, 3, 100, 132)
    for name in ('swin_t', 'swinv2_t'):
        model = timm.create_model(name, **TINY).eval()
        with torch.no_grad():
            want = model(x)
            torch.testing.assert_close(torch.jit.script(model)(x), want)
    with torch.no_grad():  # the V2 model
        got = create_feature_extractor(model, {'stages.1': 's1', 'head': 'out'})(x)
    torch.testing.assert_close(got['out'], want)
    assert got['s1'].shape == (1, 13, 17, 16)
    features = timm.create_model('swin_t', features_only=True, **TINY).eval()
    with torch.no_grad():
        for a, b in zip(torch.jit.script(features)(x), features(x)):
            torch.testing.assert_close(a, b)


def test_model_api_and_errors():
    model = timm.create_model('swin_t', device='meta')
    assert len(model.no_weight_decay()) == 12 and all(n.endswith('relative_position_bias_table')
                                                      for n in model.no_weight_decay())
    v2 = timm.create_model('swinv2_t', device='meta')
    nwd = v2.no_weight_decay()  # 12 blocks: the position MLP's 3 tensors and the logit scale
    assert len(nwd) == 48 and all('.cpb_mlp.' in n or n.endswith('.logit_scale') for n in nwd)
    from timm.models._manipulate import group_parameters
    assert len(group_parameters(model, model.group_matcher(coarse=True))) == 6  # stem, 4 stages, head/norm
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7
    with pytest.raises(ValueError, match='num_heads'):
        timm.create_model('swin_t', device='meta', num_heads=(3, 6, 12))
    with pytest.raises(ValueError, match='version'):
        timm.create_model('swin_t', device='meta', version=3)
    with pytest.raises(ValueError, match='pad_mode'):
        timm.create_model('swin_t', device='meta', pad_mode='reflect')
    with pytest.raises(ValueError, match='embed_dim'):
        timm.create_model('swin_t', device='meta', embed_dim=0)
