"""ShiftViT backbones: parameter counts against the paper's table, the released configurations, the released
checkpoint layout (a synthesized state dict, mapped by ``checkpoint_filter_fn``) computing a functional float64
forward written from the released code (microsoft/SPACH ``models/shiftvit.py``), features and timm's model API."""

import re

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import GroupNorm1

import visattn  # noqa: F401  (registers the models)
from visattn.models.shiftvit import checkpoint_filter_fn

NAMES = ['shiftvit_t_light', 'shiftvit_t', 'shiftvit_s_light', 'shiftvit_s', 'shiftvit_b_light', 'shiftvit_b']
# arXiv:2201.10801 and the released README's table (T and S); B: the paper's rows (not in the README)
PAPER_M = {'shiftvit_t_light': 20, 'shiftvit_t': 29, 'shiftvit_s_light': 34, 'shiftvit_s': 50,
           'shiftvit_b_light': 60, 'shiftvit_b': 89}
EXACT = {'shiftvit_t_light': 19_608_328, 'shiftvit_t': 28_566_664, 'shiftvit_s_light': 33_796_360,
         'shiftvit_s': 50_304_136, 'shiftvit_b_light': 59_708_776, 'shiftvit_b': 89_026_408}
TINY = dict(depths=(1, 2, 1, 1), embed_dim=24, mlp_ratio=2., num_classes=10, drop_path_rate=0.)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_paper():
    for name in NAMES:
        n = _count(timm.create_model(name, device='meta'))
        assert round(n / 1e6) == PAPER_M[name], (name, n)
        assert n == EXACT[name], (name, n)


def test_released_configurations():
    m = timm.create_model('shiftvit_t', device='meta')
    assert [len(s.blocks) for s in m.stages] == [6, 8, 18, 6]
    assert [s.blocks[0].mlp.fc1.in_channels for s in m.stages] == [96, 192, 384, 768]
    assert m.stages[0].blocks[0].mlp.fc1.out_channels == 2 * 96  # r2: MLP ratio 2
    assert [s.blocks[0].shift.group for s in m.stages] == [8, 16, 32, 64]  # C // 12
    assert all(isinstance(n, GroupNorm1) for n in (m.patch_embed.norm, m.norm, m.stages[1].downsample.norm,
                                                    m.stages[2].blocks[3].norm2))
    assert abs(m.stages[3].blocks[5].drop_path.drop_prob - 0.2) < 1e-12
    assert isinstance(m.stages[0].blocks[0].drop_path, torch.nn.Identity)  # linear from 0
    assert m.patch_embed.proj.kernel_size == m.patch_embed.proj.stride == (4, 4)
    down = m.stages[1].downsample.reduction
    assert down.kernel_size == down.stride == (2, 2) and down.bias is None and down.out_channels == 192
    assert isinstance(m.stages[0].downsample, torch.nn.Identity)
    light = timm.create_model('shiftvit_t_light', device='meta')
    assert [len(s.blocks) for s in light.stages] == [2, 2, 6, 2]
    assert light.stages[0].blocks[0].mlp.fc1.out_channels == 4 * 96
    base = timm.create_model('shiftvit_b_light', device='meta')
    assert [s.blocks[0].shift.group for s in base.stages] == [8, 16, 32, 64]  # 128 // 16
    bn = timm.create_model('shiftvit_t_light', norm_layer='BN', device='meta')
    assert isinstance(bn.stages[2].blocks[0].norm2, torch.nn.BatchNorm2d) and isinstance(bn.norm, torch.nn.BatchNorm2d)


def test_bad_arguments():
    with pytest.raises(ValueError, match='norm_layer'):
        timm.create_model('shiftvit_t_light', norm_layer='ln', device='meta')
    with pytest.raises(ValueError, match='n_div'):
        timm.create_model('shiftvit_t_light', n_div=3, device='meta')
    with pytest.raises(ValueError, match='depths'):
        timm.create_model('shiftvit_t_light', depths=(2, 0, 2, 2), device='meta')


def to_released(state_dict: dict) -> dict:
    """Our keys -> the released code's (``layers.i`` closing with its patch merging, a plain ``head``)."""
    out = {}
    for key, value in state_dict.items():
        m = re.match(r'stages\.(\d+)\.(blocks|downsample)\.(.*)', key)
        if m:
            i, part, rest = int(m.group(1)), m.group(2), m.group(3)
            key = f'layers.{i}.blocks.{rest}' if part == 'blocks' else f'layers.{i - 1}.downsample.{rest}'
        elif key.startswith('head.fc.'):
            key = 'head.' + key[len('head.fc.'):]
        out[key] = value
    return out


def _gn(x, sd, p):
    return F.group_norm(x, 1, sd[p + '.weight'], sd[p + '.bias'])


def _released_shift(x, n_div):
    """The released ``ShiftViTBlock.shift_feat``, slice by slice."""
    g = x.shape[1] // n_div
    out = torch.zeros_like(x)
    out[:, :g, :, :-1] = x[:, :g, :, 1:]
    out[:, g:2 * g, :, 1:] = x[:, g:2 * g, :, :-1]
    out[:, 2 * g:3 * g, :-1, :] = x[:, 2 * g:3 * g, 1:, :]
    out[:, 3 * g:4 * g, 1:, :] = x[:, 3 * g:4 * g, :-1, :]
    out[:, 4 * g:] = x[:, 4 * g:]
    return out


def released_shiftvit_forward(sd, x, depths, n_div=12):
    """The released ``ShiftViT.forward`` written out from its layer order, reading a state dict in its layout."""
    x = F.conv2d(x, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=4)
    x = _gn(x, sd, 'patch_embed.norm')
    for level, depth in enumerate(depths):
        for j in range(depth):
            p = f'layers.{level}.blocks.{j}.'
            x = _released_shift(x, n_div)
            y = F.conv2d(_gn(x, sd, p + 'norm2'), sd[p + 'mlp.fc1.weight'], sd[p + 'mlp.fc1.bias'])
            x = x + F.conv2d(F.gelu(y), sd[p + 'mlp.fc2.weight'], sd[p + 'mlp.fc2.bias'])
        if level < len(depths) - 1:
            p = f'layers.{level}.downsample.'
            x = F.conv2d(_gn(x, sd, p + 'norm'), sd[p + 'reduction.weight'], stride=2)
    x = _gn(x, sd, 'norm').mean((2, 3))
    return F.linear(x, sd['head.weight'], sd['head.bias'])


def test_released_checkpoint_layout_loads_and_computes_shiftvit():
    torch.manual_seed(0)
    model = timm.create_model('shiftvit_t_light', **TINY).double().eval()
    released = {k: torch.randn_like(v) * 0.3 + float('norm' in k and k.endswith('.weight'))
                for k, v in to_released(model.state_dict()).items()}
    assert {'layers.0.downsample.reduction.weight', 'layers.2.downsample.norm.bias', 'layers.1.blocks.1.norm2.weight',
            'layers.3.blocks.0.mlp.fc2.bias', 'patch_embed.norm.weight', 'head.weight'} <= set(released)
    assert not any(k.startswith(('layers.3.downsample', 'stages.')) for k in released)
    model.load_state_dict(checkpoint_filter_fn({'model': released}, model))
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    want = released_shiftvit_forward(released, x, TINY['depths'])
    torch.testing.assert_close(model(x), want, rtol=1e-10, atol=1e-10)
    assert checkpoint_filter_fn(model.state_dict(), model).keys() == model.state_dict().keys()


def test_features_and_intermediates_at_a_non_square_size():
    model = timm.create_model('shiftvit_t_light', features_only=True, **{**TINY, 'num_classes': 0})
    x = torch.randn(1, 3, 64, 96)
    feats = model(x)
    assert [f.shape for f in feats] == [(1, 24, 16, 24), (1, 48, 8, 12), (1, 96, 4, 6), (1, 192, 2, 3)]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    net = timm.create_model('shiftvit_t_light', **TINY).eval()
    final, inter = net.forward_intermediates(x, indices=[1, 3], norm=True)
    assert [t.shape for t in inter] == [(1, 48, 8, 12), (1, 192, 2, 3)]
    torch.testing.assert_close(final, net.forward_features(x))
    torch.testing.assert_close(inter[-1], final)
    assert net.forward_head(final, pre_logits=True).shape == (1, 192)
    net.prune_intermediate_layers(indices=[2])
    assert len(net.stages) == 3 and net.num_features == 96


def test_grad_checkpointing_and_reset_classifier():
    torch.manual_seed(0)
    net = timm.create_model('shiftvit_t_light', **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    want = net(x)
    net.set_grad_checkpointing()
    torch.testing.assert_close(net(x), want)
    net.reset_classifier(3)
    assert net(x).shape == (2, 3) and net.get_classifier().out_features == 3
    assert net.group_matcher()['stem'] == r'^patch_embed'
