"""sMLPNet backbones: parameter counts against the paper's table, the released configurations, the released
checkpoint layout (a synthesized state dict, mapped by ``checkpoint_filter_fn``) computing a functional float64
forward written from the released code (microsoft/SPACH ``models/smlp.py``), other input sizes, features and timm's
model API."""

import timm
import torch
import torch.nn.functional as F

import visattn  # noqa: F401  (registers the models)
from visattn.models.smlpnet import checkpoint_filter_fn

NAMES = ['smlpnet_t', 'smlpnet_s', 'smlpnet_b']
PAPER_M = {'smlpnet_t': 24, 'smlpnet_s': 49, 'smlpnet_b': 66}  # arXiv:2109.05422 and the released README
EXACT = {'smlpnet_t': 24_123_584, 'smlpnet_s': 48_558_136, 'smlpnet_b': 65_880_408}
TINY = dict(depths=(1, 2, 1, 1), embed_dim=16, mlp_ratio=2., img_size=64, num_classes=10)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_paper():
    for name in NAMES:
        n = _count(timm.create_model(name, device='meta'))
        assert round(n / 1e6) == PAPER_M[name], (name, n)
        assert n == EXACT[name], (name, n)


def test_released_configurations():
    m = timm.create_model('smlpnet_t', device='meta')
    assert [len(s.blocks) for s in m.stages] == [2, 8, 14, 2]
    assert [s.blocks[0].smlp.channels for s in m.stages] == [80, 160, 320, 640]
    assert [s.blocks[0].smlp.feat_size for s in m.stages] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert m.stages[0].blocks[0].mlp.fc1.out_features == 3 * 80  # alpha 3
    blk = m.stages[1].blocks[0]
    assert blk.dw_conv.groups == 160 and blk.dw_conv.kernel_size == (3, 3) and blk.dw_conv.bias is None
    assert isinstance(blk.dw_norm, torch.nn.BatchNorm2d) and isinstance(blk.smlp.norm, torch.nn.BatchNorm2d)
    assert isinstance(blk.norm, torch.nn.LayerNorm) and isinstance(m.norm, torch.nn.BatchNorm2d)
    assert m.patch_embed.proj.stride == (4, 4) and m.patch_embed.proj.bias is None and m.patch_embed.norm.__class__ \
        is torch.nn.Identity
    down = m.stages[1].downsample
    assert down.kernel_size == down.stride == (2, 2) and down.bias is None and down.out_channels == 160
    s = timm.create_model('smlpnet_s', device='meta')
    assert [len(st.blocks) for st in s.stages] == [2, 10, 24, 2] and s.stages[0].blocks[0].smlp.channels == 96
    assert abs(s.stages[3].blocks[1].drop_path.drop_prob - 0.2) < 1e-12
    b = timm.create_model('smlpnet_b', device='meta')
    assert b.stages[0].blocks[0].smlp.channels == 112 and abs(b.stages[3].blocks[1].drop_path.drop_prob - 0.3) < 1e-12
    m384 = timm.create_model('smlpnet_t', img_size=384, device='meta')
    assert [st.blocks[0].smlp.feat_size for st in m384.stages] == [(96, 96), (48, 48), (24, 24), (12, 12)]


def to_released(model) -> dict:
    """Our state dict -> the released code's keys (flat block lists, the sMLP axis maps as 1×1 convs)."""
    inv = {
        'dw_norm.': '0.conv_merge.BN.', 'dw_conv.': '0.conv_merge.Conv.', 'smlp.norm.': '1.BN.',
        'smlp.proj_w.': '1.proj_h.', 'smlp.proj_h.': '1.proh_w.', 'smlp.fuse.': '1.fuse.',
    }
    mix = {'norm.': '1.', 'mlp.fc1.': '2.net.0.', 'mlp.fc2.': '2.net.3.'}
    out, k = {}, 0
    sd = model.state_dict()
    out['to_patch_embedding.0.0.weight'] = sd['patch_embed.proj.weight']
    for i, stage in enumerate(model.stages):
        if i > 0:
            out[f'to_patch_embedding.{i}.0.weight'] = sd[f'stages.{i}.downsample.weight']
        for j in range(len(stage.blocks)):
            p = f'stages.{i}.blocks.{j}.'
            for key, value in sd.items():
                if not key.startswith(p):
                    continue
                rest = key[len(p):]
                for ours, theirs in inv.items():
                    if rest.startswith(ours):
                        if ours.startswith('smlp.proj_') and rest.endswith('weight'):
                            value = value[:, :, None, None]
                        out[f'token_mix.{k}.{theirs}{rest[len(ours):]}'] = value
                for ours, theirs in mix.items():
                    if rest.startswith(ours):
                        out[f'channel_mix.{k}.{theirs}{rest[len(ours):]}'] = value
            k += 1
    for key, value in sd.items():
        if key.startswith('norm.'):
            out['batch_norm.' + key[5:]] = value
        elif key.startswith('head.fc.'):
            out['mlp_head.0.' + key[8:]] = value
    return out


def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + 'running_mean'], sd[p + 'running_var'], sd[p + 'weight'], sd[p + 'bias'])


def released_smlpnet_forward(sd, x, depths):
    """The released ``sMLPNet.forward`` (eval) written out from its layer order, reading its state dict layout."""
    k = 0
    for i, depth in enumerate(depths):
        x = F.conv2d(x, sd[f'to_patch_embedding.{i}.0.weight'], stride=4 if i == 0 else 2)
        C = x.shape[1]
        for _ in range(depth):
            p = f'token_mix.{k}.'
            t = F.conv2d(F.gelu(_bn(x, sd, p + '0.conv_merge.BN.')), sd[p + '0.conv_merge.Conv.weight'], padding=1,
                         groups=C)
            t = F.gelu(_bn(t, sd, p + '1.BN.'))
            x_h = F.conv2d(t.permute(0, 3, 1, 2), sd[p + '1.proj_h.weight'], sd[p + '1.proj_h.bias'])
            x_w = F.conv2d(t.permute(0, 2, 1, 3), sd[p + '1.proh_w.weight'], sd[p + '1.proh_w.bias'])
            x_h, x_w = x_h.permute(0, 2, 3, 1), x_w.permute(0, 2, 1, 3)
            x = x + F.conv2d(torch.cat([t, x_h, x_w], 1), sd[p + '1.fuse.weight'])
            p = f'channel_mix.{k}.'
            c = F.layer_norm(x.permute(0, 2, 3, 1), (C,), sd[p + '1.weight'], sd[p + '1.bias'])
            c = F.linear(F.gelu(F.linear(c, sd[p + '2.net.0.weight'], sd[p + '2.net.0.bias'])),
                         sd[p + '2.net.3.weight'], sd[p + '2.net.3.bias'])
            x = x + c.permute(0, 3, 1, 2)
            k += 1
    x = _bn(x, sd, 'batch_norm.').mean((2, 3))
    return F.linear(x, sd['mlp_head.0.weight'], sd['mlp_head.0.bias'])


def test_released_checkpoint_layout_loads_and_computes_smlpnet():
    torch.manual_seed(0)
    model = timm.create_model('smlpnet_t', **TINY).double().eval()
    released = {}
    for key, v in to_released(model).items():
        if key.endswith('num_batches_tracked'):
            released[key] = v
        elif key.endswith('running_var'):
            released[key] = torch.rand_like(v) + 0.5
        else:
            released[key] = torch.randn_like(v) * 0.3 + float(key.endswith(('BN.weight', 'batch_norm.weight')))
    assert {'to_patch_embedding.3.0.weight', 'token_mix.4.1.proh_w.weight', 'token_mix.0.0.conv_merge.Conv.weight',
            'channel_mix.2.2.net.3.bias', 'batch_norm.running_var', 'mlp_head.0.weight'} <= set(released)
    assert released['token_mix.1.1.proj_h.weight'].shape == (8, 8, 1, 1)  # stage 1 at img_size 64: an 8×8 grid
    model.load_state_dict(checkpoint_filter_fn({'model': released}, model))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    torch.testing.assert_close(model(x), released_smlpnet_forward(released, x, TINY['depths']), rtol=1e-10,
                               atol=1e-10)
    assert checkpoint_filter_fn(model.state_dict(), model).keys() == model.state_dict().keys()


def test_other_input_sizes_and_features():
    torch.manual_seed(0)
    model = timm.create_model('smlpnet_t', features_only=True, **{**TINY, 'num_classes': 0}).eval()
    x = torch.randn(1, 3, 96, 64)  # the sMLP weights are built for 64×64 and resized
    feats = model(x)
    assert [f.shape for f in feats] == [(1, 16, 24, 16), (1, 32, 12, 8), (1, 64, 6, 4), (1, 128, 3, 2)]
    assert all(torch.isfinite(f).all() for f in feats)
    net = timm.create_model('smlpnet_t', **TINY).eval()
    final, inter = net.forward_intermediates(x, indices=[0, 3], norm=True)
    assert [t.shape for t in inter] == [(1, 16, 24, 16), (1, 128, 3, 2)]
    torch.testing.assert_close(final, net.forward_features(x))
    torch.testing.assert_close(inter[-1], final)
    want = net(x)
    net.set_grad_checkpointing()
    torch.testing.assert_close(net(x), want)
    net.prune_intermediate_layers(indices=[1])
    assert len(net.stages) == 2 and net.num_features == 32 and net(x).shape == (1, 32, 12, 8)  # head pruned
