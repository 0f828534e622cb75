"""S²-MLP and S²-MLPv2 backbones: parameter counts against the papers' tables (and S²-MLP's own counting formula),
the papers' configurations, a float64 forward written from the papers' equations (the in-place spatial shifts of
their Algorithm 1 on [w, h, c] maps, split attention eqs. 2-4), other input sizes, features and timm's API."""

import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import visattn  # noqa: F401  (registers the models)
from visattn.models.s2mlp import S2MLP, Affine2d, S2MLPv2

# arXiv:2106.07477 Table 2/3 (without the classifier) and arXiv:2108.01072 Table 2
PAPER_M = {'s2mlp_wide': 71, 's2mlp_deep': 51, 's2mlpv2_small': 25, 's2mlpv2_medium': 55}
EXACT = {'s2mlp_wide': 72_241_384, 's2mlp_deep': 53_917_288, 's2mlpv2_small': 25_113_448,
         's2mlpv2_medium': 55_269_864}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_the_papers():
    for name, n_paper in PAPER_M.items():
        m = timm.create_model(name, device='meta')
        n = _count(m)
        assert n == EXACT[name], (name, n)
        if name.startswith('s2mlpv2'):
            assert round(n / 1e6) == n_paper, (name, n)
            continue
        # S²-MLP counts without the classifier, fully-connected layers only: (3p² + 1)c + N(c²(2r + 2) + c(3 + r))
        c, N, r, p = m.embed_dim, len(m.blocks), 4, 16
        fc = sum(_count(mod) for mod in m.modules() if isinstance(mod, nn.Conv2d))
        assert fc == (3 * p * p + 1) * c + N * (c * c * (2 * r + 2) + c * (3 + r)), name
        without_head = n - _count(m.head)
        if name == 's2mlp_wide':
            assert round(without_head / 1e6) == round(fc / 1e6) == n_paper == 71
        else:  # the formula gives 53.48M for the printed configuration (c = 384, N = 36); the paper prints 51M
            assert round(fc / 1e6) == 53 and round(without_head / 1e6) == 54


def test_papers_configurations():
    wide, deep = (timm.create_model(n, device='meta') for n in ('s2mlp_wide', 's2mlp_deep'))
    assert (wide.embed_dim, len(wide.blocks), deep.embed_dim, len(deep.blocks)) == (768, 12, 384, 36)
    assert wide.patch_embed.proj.stride == (16, 16) and wide.blocks[0].mlp.fc1.out_channels == 4 * 768
    assert isinstance(wide.patch_embed.norm, timm.layers.LayerNorm2d) and isinstance(wide.norm, nn.Identity)
    assert isinstance(deep.patch_embed.norm, Affine2d) and isinstance(deep.blocks[3].norm2, Affine2d)
    assert wide.blocks[0].mixer.version == 1
    small, medium = (timm.create_model(n, device='meta') for n in ('s2mlpv2_small', 's2mlpv2_medium'))
    assert [len(s.blocks) for s in small.stages] == [4, 14] and [len(s.blocks) for s in medium.stages] == [7, 17]
    assert [s.blocks[0].mixer.channels for s in small.stages] == [192, 384]
    assert [s.blocks[0].mixer.channels for s in medium.stages] == [256, 512]
    mix = small.stages[1].blocks[0].mixer
    assert mix.version == 2 and mix.attn_fc1.weight.shape == (96, 384) and mix.attn_fc2.weight.shape == (3 * 384, 96)
    assert mix.attn_fc1.bias is None and small.stages[0].blocks[0].mlp.fc1.out_channels == 3 * 192
    assert small.patch_embed.proj.stride == (7, 7) and small.stages[1].downsample.stride == (2, 2)
    assert abs(small.stages[1].blocks[-1].drop_path.drop_prob - 0.1) < 1e-12
    assert [f['reduction'] for f in small.feature_info] == [7] * 4 + [14] * 14
    assert small.feature_info[4]['module'] == 'stages.1.blocks.0'


def _shift1(x):
    """The papers' Algorithm 1 ``spatial_shift1`` on x [b, w, h, c] (in place on a copy)."""
    x = x.clone()
    b, w, h, c = x.shape
    x[:, 1:, :, :c // 4] = x[:, :w - 1, :, :c // 4].clone()
    x[:, :w - 1, :, c // 4:c // 2] = x[:, 1:, :, c // 4:c // 2].clone()
    x[:, :, 1:, c // 2:c * 3 // 4] = x[:, :, :h - 1, c // 2:c * 3 // 4].clone()
    x[:, :, :h - 1, 3 * c // 4:] = x[:, :, 1:, 3 * c // 4:].clone()
    return x


def _shift2(x):
    x = x.clone()
    b, w, h, c = x.shape
    x[:, :, 1:, :c // 4] = x[:, :, :h - 1, :c // 4].clone()
    x[:, :, :h - 1, c // 4:c // 2] = x[:, :, 1:, c // 4:c // 2].clone()
    x[:, 1:, :, c // 2:c * 3 // 4] = x[:, :w - 1, :, c // 2:c * 3 // 4].clone()
    x[:, :w - 1, :, 3 * c // 4:] = x[:, 1:, :, 3 * c // 4:].clone()
    return x


def _lin(x, sd, p):  # a 1×1 conv of ours as the papers' fully-connected layer on [b, w, h, c]
    w = sd[p + 'weight']
    return F.linear(x, w.reshape(w.shape[0], -1), sd.get(p + 'bias'))


def _ln(x, sd, p):
    if p + 'alpha' in sd:
        return x * sd[p + 'alpha'] + sd[p + 'beta']
    return F.layer_norm(x, x.shape[-1:], sd[p + 'weight'], sd[p + 'bias'], eps=1e-6)


def _mixer(x, sd, p, version):
    if version == 1:
        return _lin(_shift1(F.gelu(_lin(x, sd, p + 'fc1.'))), sd, p + 'fc2.')
    c = x.shape[-1]
    x = _lin(x, sd, p + 'fc1.')
    xs = [_shift1(x[..., :c]), _shift2(x[..., c:2 * c]), x[..., 2 * c:]]
    a = sum(t.sum((1, 2)) for t in xs)  # eq. 2: the sum over the positions and the branches
    a = F.linear(F.gelu(F.linear(a, sd[p + 'attn_fc1.weight'])), sd[p + 'attn_fc2.weight'])  # eq. 3
    a = torch.softmax(a.reshape(-1, 3, c), dim=1)
    x = sum(t * a[:, k, None, None, :] for k, t in enumerate(xs))  # eq. 4
    return _lin(x, sd, p + 'fc2.')


def _block(x, sd, p, version):
    x = x + _mixer(_ln(x, sd, p + 'norm1.'), sd, p + 'mixer.', version)
    y = _lin(F.gelu(_lin(_ln(x, sd, p + 'norm2.'), sd, p + 'mlp.fc1.')), sd, p + 'mlp.fc2.')
    return x + y


def reference(sd, x, depths, patch, version):
    """The papers' network on [b, w, h, c] maps (the paper's axis order: width first)."""
    x = F.conv2d(x, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=patch)
    x = x.permute(0, 3, 2, 1)  # [b, c, h, w] -> [b, w, h, c]
    if version == 1:
        if 'patch_embed.norm.weight' in sd or 'patch_embed.norm.alpha' in sd:
            x = _ln(x, sd, 'patch_embed.norm.')
        for i in range(depths[0]):
            x = _block(x, sd, f'blocks.{i}.', 1)
    else:
        for i, depth in enumerate(depths):
            if i:
                w = sd[f'stages.{i}.downsample.weight']
                x = F.conv2d(x.permute(0, 3, 2, 1), w, sd[f'stages.{i}.downsample.bias'], stride=2).permute(0, 3, 2, 1)
            for j in range(depth):
                x = _block(x, sd, f'stages.{i}.blocks.{j}.', 2)
        x = _ln(x, sd, 'norm.')
    return F.linear(x.mean((1, 2)), sd['head.fc.weight'], sd['head.fc.bias'])


def _randomize(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + float(name.endswith(('norm1.weight', 'alpha'))))


@pytest.mark.parametrize('norm_layer', ['ln', 'affine'])
def test_s2mlp_computes_the_papers_forward(norm_layer):
    model = S2MLP(patch_size=4, embed_dim=16, depth=2, norm_layer=norm_layer, num_classes=5).double().eval()
    _randomize(model)
    x = torch.randn(2, 3, 20, 28, dtype=torch.float64)  # a 5×7 map: the shifts' borders on unequal sides
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(model.state_dict(), x, [2], 4, 1), rtol=1e-10, atol=1e-10)


def test_s2mlpv2_computes_the_papers_forward():
    model = S2MLPv2(patch_size=3, embed_dims=(8, 16), depths=(1, 2), num_classes=5).double().eval()
    _randomize(model)
    x = torch.randn(2, 3, 30, 42, dtype=torch.float64)  # 10×14, then 5×7
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(model.state_dict(), x, [1, 2], 3, 2), rtol=1e-10,
                                   atol=1e-10)


def test_other_input_sizes_features_and_timm_api():
    x = torch.randn(1, 3, 56, 84)  # multiples of 14: 8×12, then 4×6
    f = timm.create_model('s2mlpv2_small', features_only=True, embed_dims=(8, 16), depths=(1, 1))
    assert f.feature_info.reduction() == [7, 14] and [o.shape for o in f(x)] == [(1, 8, 8, 12), (1, 16, 4, 6)]
    f = timm.create_model('s2mlp_deep', features_only=True, embed_dim=16, depth=8, out_indices=(1, 3))
    assert [o.shape for o in f(torch.randn(1, 3, 48, 80))] == [(1, 16, 3, 5)] * 2 and len(f.model.blocks) == 4
    model = timm.create_model('s2mlp_wide', embed_dim=16, depth=3, num_classes=4).eval()
    final, inter = model.forward_intermediates(x, indices=2)
    assert [t.shape for t in inter] == [(1, 16, 3, 5)] * 2
    torch.testing.assert_close(final, model.forward_features(x))
    v2 = timm.create_model('s2mlpv2_small', embed_dims=(8, 16), depths=(1, 2), num_classes=4).eval()
    want = v2(x)
    v2.set_grad_checkpointing()
    torch.testing.assert_close(v2(x), want)
    v2.prune_intermediate_layers(indices=[0])
    assert len(v2.stages) == 1 and v2(x).shape == (1, 8, 8, 12)  # head and pooling pruned
    f = timm.create_model('s2mlpv2_small', features_only=True, embed_dims=(8, 16), depths=(2, 3))  # (1, 2, 3, 4)
    assert f.feature_info.reduction() == [7, 14, 14, 14] and len(f.model.stages[1].blocks) == 3
    with pytest.raises(ValueError, match='norm_layer'):
        S2MLP(norm_layer='bn', device='meta')
    with pytest.raises(ValueError, match='depths'):
        S2MLPv2(embed_dims=(8,), depths=(1, 1), device='meta')
    with pytest.raises(RuntimeError, match='No pretrained weights'):
        timm.create_model('s2mlpv2_small', pretrained=True)


def test_s2mlpv2_block_taps_and_pruning():
    """S²-MLPv2's taps are its blocks over both levels: stop_early and pruning keep them, pruned features end at the
    tap, the final norm follows the last level only."""
    torch.manual_seed(0)
    model = timm.create_model('s2mlpv2_small', embed_dims=(8, 16), depths=(2, 3), num_classes=4).eval()
    x = torch.randn(2, 3, 42, 56)  # 6×8, then 3×4
    with torch.no_grad():
        expected = model(x)
        final, taps = model.forward_intermediates(x)
        assert [t.shape[1:] for t in taps] == [(8, 6, 8)] * 2 + [(16, 3, 4)] * 3
        torch.testing.assert_close(final, model.forward_features(x))
        normed = model.forward_intermediates(x, indices=[1, 4], norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[0], taps[1])  # the first level: no norm
        torch.testing.assert_close(normed[1], model.norm(taps[4]))
        for i in range(5):
            sel = model.forward_intermediates(x, indices=[i], stop_early=True, intermediates_only=True)
            torch.testing.assert_close(sel[0], taps[i])
            pruned = copy.deepcopy(model)
            take = pruned.prune_intermediate_layers([i], prune_norm=True)
            assert sum(len(s.blocks) for s in pruned.stages) == i + 1
            torch.testing.assert_close(pruned.forward_intermediates(x, indices=take, intermediates_only=True)[0],
                                       taps[i])
            torch.testing.assert_close(pruned.forward_features(x), taps[i])
            assert pruned.num_features == taps[i].shape[1] and pruned(x).shape == taps[i].shape
        pruned = copy.deepcopy(model)
        pruned.prune_intermediate_layers([4], prune_head=False)
        torch.testing.assert_close(pruned(x), expected)
        final, _ = model.forward_intermediates(x, indices=[1], stop_early=True)
        torch.testing.assert_close(final, taps[1])  # stopped in the first level: no final norm
    pruned = copy.deepcopy(model).train()
    take = pruned.prune_intermediate_layers([3])
    feats = pruned.forward_intermediates(x, indices=take, intermediates_only=True)
    (feats[0].sum() + pruned.forward_features(x).sum()).backward()
    assert not [n for n, p in pruned.named_parameters() if p.grad is None]
