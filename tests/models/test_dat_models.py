"""DAT backbones: parameter counts against the paper's table and the released code, the structure of the released
configurations, the released checkpoint layout (a synthesized state dict, mapped by ``checkpoint_filter_fn``)
computing a functional float64 DAT forward written from the released code's layer order, features, and timm's API."""

import math
import re

import pytest
import timm
import torch
import torch.nn.functional as F

import visattn  # noqa: F401  (registers the models)
from visattn.layers import DeformableAttn, WindowAttn
from visattn.models.dat import checkpoint_filter_fn

NAMES = ['dat_tiny', 'dat_small', 'dat_base']
# arXiv:2201.00520, Table 2 (ImageNet-1K): 29M / 50M / 88M
PAPER_M = {'dat_tiny': 29, 'dat_small': 50, 'dat_base': 88}
# what the released code (LeapLabTHU/DAT, CVPR version) builds for configs/dat_{tiny,small,base}.yaml
EXACT = {'dat_tiny': 28_319_138, 'dat_small': 49_700_402, 'dat_base': 87_881_632}
TINY = dict(depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), groups=(1, 1, 2, 2), embed_dim=8, num_classes=10)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_paper_and_the_released_code():
    for name in NAMES:
        n = _count(timm.create_model(name, device='meta'))
        assert n == EXACT[name], (name, n)
        if name == 'dat_tiny':  # 28.32M, printed 29M in the paper's table
            assert abs(n / 1e6 - PAPER_M[name]) < 0.7, (name, n)
        else:
            assert round(n / 1e6) == PAPER_M[name], (name, n)


def test_released_configurations():
    m = timm.create_model('dat_small', device='meta')
    kinds = [[b.kind for b in s.blocks] for s in m.stages]
    assert kinds == [['L', 'S'], ['L', 'S'], ['L', 'D'] * 9, ['L', 'D']]
    assert [s.blocks[0].attn.num_heads for s in m.stages] == [3, 6, 12, 24]
    assert [s.blocks[0].attn.channels for s in m.stages] == [96, 192, 384, 768]
    for s in m.stages:
        for b in s.blocks:
            assert isinstance(b.attn, DeformableAttn if b.kind == 'D' else WindowAttn)
            assert b.mlp.fc1.out_features == 4 * b.norm2.normalized_shape[0]
            if b.kind != 'D':
                assert b.attn.window_size == 7 and b.attn.shift_size == (4 if b.kind == 'S' else 0)
    d3, d4 = m.stages[2].blocks[1].attn, m.stages[3].blocks[1].attn
    assert (d3.n_groups, d3.kernel_size, d3.stride, d3.offset_range_factor, d3.use_pe) == (3, 5, 1, 2., True)
    assert (d4.n_groups, d4.kernel_size, d4.stride, d4.offset_range_factor) == (6, 3, 1, 2.)
    assert d3.rpe_table.shape == (12, 27, 27) and d4.rpe_table.shape == (24, 13, 13)  # 14² and 7² maps at 224²
    assert abs(m.stages[3].blocks[1].drop_path.drop_prob - 0.3) < 1e-12
    assert isinstance(m.stages[0].blocks[0].drop_path, torch.nn.Identity)
    assert m.patch_embed.proj.kernel_size == (4, 4) and m.patch_embed.proj.stride == (4, 4)
    down = m.stages[1].downsample
    assert down.reduction.kernel_size == (2, 2) and down.reduction.stride == (2, 2) and down.reduction.bias is None
    assert isinstance(m.stages[0].downsample, torch.nn.Identity)
    tiny = timm.create_model('dat_tiny', device='meta')
    assert [[b.kind for b in s.blocks] for s in tiny.stages] == [['L', 'S'], ['L', 'S'], ['L', 'D'] * 3, ['L', 'D']]
    base = timm.create_model('dat_base', device='meta')
    assert [s.blocks[0].attn.num_heads for s in base.stages] == [4, 8, 16, 32]
    assert (base.stages[2].blocks[1].attn.n_groups, base.stages[3].blocks[1].attn.n_groups) == (4, 8)
    assert base.num_features == 1024
    assert abs(base.stages[3].blocks[1].drop_path.drop_prob - 0.5) < 1e-12
    m384 = timm.create_model('dat_tiny', device='meta', img_size=384)
    assert m384.stages[2].blocks[1].attn.rpe_table.shape == (12, 47, 47)


def to_released(state_dict: dict) -> dict:
    """Our keys -> the released code's, with the window blocks' buffers it has."""
    out = {}
    for key, value in state_dict.items():
        if m := re.match(r'stages\.(\d+)\.blocks\.(\d+)\.(norm[12]|attn|mlp)\.(.*)', key):
            i, j, part, rest = m.groups()
            if part.startswith('norm'):
                key = f'stages.{i}.layer_norms.{2 * int(j) + int(part[-1]) - 1}.norm.{rest}'
            elif part == 'mlp':
                key = f'stages.{i}.mlps.{j}.chunk.linear{rest[2]}.{rest[4:]}'
            else:
                rest = re.sub(r'^qkv\.', 'proj_qkv.', re.sub(r'^proj\.', 'proj_out.', rest))
                key = f'stages.{i}.attns.{j}.{rest}'
                if rest == 'relative_position_bias_table':  # the released window buffers (the filter drops them)
                    out[f'stages.{i}.attns.{j}.relative_position_index'] = torch.zeros(49, 49, dtype=torch.long)
                    if int(j) % 2:
                        out[f'stages.{i}.attns.{j}.attn_mask'] = torch.zeros(1, 49, 49)
        elif m := re.match(r'stages\.(\d+)\.downsample\.(reduction|norm)\.(.*)', key):
            part = '0' if m.group(2) == 'reduction' else '1.norm'
            key = f'down_projs.{int(m.group(1)) - 1}.{part}.{m.group(3)}'
        elif key.startswith('patch_embed.'):
            key = key.replace('patch_embed.proj.', 'patch_proj.0.').replace('patch_embed.norm.', 'patch_proj.1.norm.')
        elif key.startswith('norm.'):
            key = 'cls_norm.' + key
        elif key.startswith('head.fc.'):
            key = 'cls_head.' + key[len('head.fc.'):]
        out[key] = value
    return out


def _ln(x, sd, p):
    """The released LayerNormProxy on [B, C, H, W]."""
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], sd[p + '.weight'], sd[p + '.bias']).permute(0, 3, 1, 2)


def _released_window(x, sd, p, heads, M, shift):
    """The released LocalAttention / ShiftWindowAttention on [B, C, H, W] (H, W multiples of M)."""
    B, C, H, W = x.shape
    if shift:
        x = torch.roll(x, (-shift, -shift), (2, 3))
    t = x.reshape(B, C, H // M, M, W // M, M).permute(0, 2, 4, 3, 5, 1).reshape(-1, M * M, C)
    q, k, v = F.linear(t, sd[p + 'proj_qkv.weight'], sd[p + 'proj_qkv.bias']).chunk(3, -1)
    q, k, v = (z.reshape(z.shape[0], M * M, heads, -1).transpose(1, 2) for z in (q, k, v))
    attn = q * (C // heads) ** -0.5 @ k.transpose(-1, -2)
    ys, xs = torch.meshgrid(torch.arange(M), torch.arange(M), indexing='ij')
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    index = (ys[:, None] - ys[None] + M - 1) * (2 * M - 1) + xs[:, None] - xs[None] + M - 1
    attn = attn + sd[p + 'relative_position_bias_table'][index].permute(2, 0, 1)
    if shift:
        img = torch.zeros(H, W)
        cuts = (slice(0, -M), slice(-M, -shift), slice(-shift, None))
        for a, hs in enumerate(cuts):
            for b, ws in enumerate(cuts):
                img[hs, ws] = 3 * a + b
        win = img.reshape(H // M, M, W // M, M).permute(0, 2, 1, 3).reshape(-1, M * M)
        mask = (win[:, None, :] != win[:, :, None]).double() * -100.
        attn = (attn.view(B, -1, heads, M * M, M * M) + mask[None, :, None]).view_as(attn)
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(-1, M * M, C)
    out = F.linear(out, sd[p + 'proj_out.weight'], sd[p + 'proj_out.bias'])
    out = out.reshape(B, H // M, W // M, M, M, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)
    return torch.roll(out, (shift, shift), (2, 3)) if shift else out


def _ref_points(H, W, dtype):
    ys, xs = torch.meshgrid(torch.linspace(0.5, H - 0.5, H, dtype=dtype), torch.linspace(0.5, W - 0.5, W, dtype=dtype),
                            indexing='ij')
    return torch.stack((ys / H * 2 - 1, xs / W * 2 - 1), -1)


def _released_deformable(x, sd, p, heads, groups, k, s=2.):
    """The released DAttentionBaseline (stride 1, use_pe, no dwc/fixed pe) on [B, C, H, W] at its table's size."""
    B, C, H, W = x.shape
    Cg, hc = C // groups, C // heads
    q = F.conv2d(x, sd[p + 'proj_q.weight'], sd[p + 'proj_q.bias'])
    off = F.conv2d(q.reshape(B * groups, Cg, H, W), sd[p + 'conv_offset.0.weight'], sd[p + 'conv_offset.0.bias'],
                   padding=k // 2, groups=Cg)
    off = F.conv2d(F.gelu(_ln(off, sd, p + 'conv_offset.1.norm')), sd[p + 'conv_offset.3.weight'])
    off = off.tanh() * torch.tensor([1. / H, 1. / W], dtype=x.dtype).view(1, 2, 1, 1) * s
    pos = off.permute(0, 2, 3, 1) + _ref_points(H, W, x.dtype)  # [B·G, H, W, 2] (y, x)
    xs = F.grid_sample(x.reshape(B * groups, Cg, H, W), pos[..., (1, 0)], mode='bilinear', align_corners=True)
    xs = xs.reshape(B, C, 1, H * W)
    kk = F.conv2d(xs, sd[p + 'proj_k.weight'], sd[p + 'proj_k.bias']).reshape(B * heads, hc, H * W)
    vv = F.conv2d(xs, sd[p + 'proj_v.weight'], sd[p + 'proj_v.bias']).reshape(B * heads, hc, H * W)
    attn = torch.einsum('bcm,bcn->bmn', q.reshape(B * heads, hc, H * W), kk) * hc ** -0.5
    disp = (_ref_points(H, W, x.dtype).reshape(1, H * W, 1, 2) - pos.reshape(B * groups, 1, H * W, 2)) * 0.5
    table = sd[p + 'rpe_table'][None].expand(B, -1, -1, -1).reshape(B * groups, heads // groups, 2 * H - 1, 2 * W - 1)
    bias = F.grid_sample(table, disp[..., (1, 0)], mode='bilinear', align_corners=True)
    attn = (attn + bias.reshape(B * heads, H * W, H * W)).softmax(-1)
    out = torch.einsum('bmn,bcn->bcm', attn, vv).reshape(B, C, H, W)
    return F.conv2d(out, sd[p + 'proj_out.weight'], sd[p + 'proj_out.bias'])


def released_dat_forward(sd, x, depths, heads, groups, M=7):
    """The released ``DAT.forward`` (use_conv_patches=False) written out from its layer order."""
    x = _ln(F.conv2d(x, sd['patch_proj.0.weight'], sd['patch_proj.0.bias'], stride=4), sd, 'patch_proj.1.norm')
    for i, depth in enumerate(depths):
        for j in range(depth):
            p = f'stages.{i}.attns.{j}.'
            y = _ln(x, sd, f'stages.{i}.layer_norms.{2 * j}.norm')
            if i >= 2 and j % 2:
                y = _released_deformable(y, sd, p, heads[i], groups[i], (9, 7, 5, 3)[i])
            else:
                y = _released_window(y, sd, p, heads[i], M, math.ceil(M / 2) if j % 2 else 0)
            x = x + y
            y = _ln(x, sd, f'stages.{i}.layer_norms.{2 * j + 1}.norm').permute(0, 2, 3, 1)
            p = f'stages.{i}.mlps.{j}.chunk.'
            y = F.linear(F.gelu(F.linear(y, sd[p + 'linear1.weight'], sd[p + 'linear1.bias'])),
                         sd[p + 'linear2.weight'], sd[p + 'linear2.bias'])
            x = x + y.permute(0, 3, 1, 2)
        if i < len(depths) - 1:
            x = _ln(F.conv2d(x, sd[f'down_projs.{i}.0.weight'], stride=2), sd, f'down_projs.{i}.1.norm')
    x = _ln(x, sd, 'cls_norm.norm').mean((2, 3))
    return F.linear(x, sd['cls_head.weight'], sd['cls_head.bias'])


def _released_state_dict(**kwargs):
    torch.manual_seed(0)
    model = timm.create_model('dat_tiny', **{**TINY, **kwargs}).double()
    released = {k: (torch.randn_like(v) * 0.3 + float('norm' in k and k.endswith('.weight')))
                if v.is_floating_point() else v for k, v in to_released(model.state_dict()).items()}
    return model, released


def test_released_checkpoint_layout_loads_and_computes_dat():
    model, released = _released_state_dict()
    keys = set(released)
    # the released layout: one layer_norms list per stage, down_projs closing stages 0-2, window buffers
    assert {'patch_proj.1.norm.weight', 'stages.0.layer_norms.3.norm.bias', 'stages.0.attns.1.proj_qkv.weight',
            'stages.0.attns.0.relative_position_index', 'stages.1.attns.1.attn_mask',
            'stages.2.attns.1.conv_offset.1.norm.weight', 'stages.3.attns.1.rpe_table',
            'stages.2.attns.1.proj_out.weight', 'stages.1.mlps.1.chunk.linear2.bias',
            'down_projs.2.0.weight', 'down_projs.0.1.norm.bias', 'cls_norm.norm.weight', 'cls_head.weight'} <= keys
    model.load_state_dict(checkpoint_filter_fn({'model': released}, model), strict=True)
    model.eval()
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)  # maps 56, 28, 14, 7: the released code's sizes
    with torch.no_grad():
        want = released_dat_forward(released, x, TINY['depths'], TINY['num_heads'], TINY['groups'])
        torch.testing.assert_close(model(x), want, rtol=1e-9, atol=1e-9)
    assert set(checkpoint_filter_fn(model.state_dict(), model)) == set(model.state_dict())  # ours passes through


def test_released_checkpoint_file_loads_with_pretrained_and_tables_resize(tmp_path):
    _, released = _released_state_dict()
    path = tmp_path / 'dat_test.pth'
    torch.save({'model': {k: v.float() if v.is_floating_point() else v for k, v in released.items()}}, path)
    loaded = timm.create_model('dat_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **TINY)
    want = checkpoint_filter_fn(released, loaded)
    for key, value in want.items():
        if not key.startswith('head.'):  # timm drops the classifier of a checkpoint for 1000 classes: 10 here
            torch.testing.assert_close(loaded.state_dict()[key], value.float(), rtol=0, atol=0, msg=key)
    # at another training size the deformable tables are resized bicubically (the released load_pretrained)
    big = timm.create_model('dat_tiny', img_size=256, **TINY)
    mapped = checkpoint_filter_fn(released, big)
    assert mapped['stages.2.blocks.1.attn.rpe_table'].shape == (2, 31, 31)
    assert mapped['stages.3.blocks.1.attn.rpe_table'].shape == (4, 15, 15)
    big.load_state_dict(mapped, strict=True)


def test_features_forward_intermediates_and_head():
    model = timm.create_model('dat_tiny', **TINY).eval()
    x = torch.randn(1, 3, 64, 32)  # maps 16×8 .. 2×1: the window blocks pad, the deformable tables are sampled
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert [tuple(t.shape) for t in inter] == [(1, 8, 16, 8), (1, 16, 8, 4), (1, 32, 4, 2), (1, 64, 2, 1)]
        feats = model.forward_features(x)
        assert feats.shape == (1, 64, 2, 1) and model.output_fmt == 'NCHW'
        torch.testing.assert_close(final, feats)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats.mean((2, 3)))
        features = timm.create_model('dat_tiny', features_only=True, **TINY).eval()
        features.model.load_state_dict(model.state_dict(), strict=False)  # pruned: no head
        outs = features(x)
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert features.feature_info.channels() == [8, 16, 32, 64]
    for a, b in zip(outs, inter):
        torch.testing.assert_close(a, b)


def test_model_api():
    model = timm.create_model('dat_tiny', device='meta')
    tables = model.no_weight_decay()
    assert len(tables) == 8 + 4  # the tables of the 8 window blocks and the 4 deformable ones
    assert {n.rsplit('.', 1)[1] for n in tables} == {'relative_position_bias_table', 'rpe_table'}
    from timm.models._manipulate import group_parameters
    assert len(group_parameters(model, model.group_matcher(coarse=True))) == 6  # stem, 4 stages, head/norm
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7
    assert model.pretrained_cfg['first_conv'] == 'patch_embed.proj'
    with pytest.raises(TypeError):
        timm.create_model('dat_tiny', device='meta', not_an_argument=1)
    with pytest.raises(ValueError, match='stage_spec'):
        timm.create_model('dat_tiny', device='meta', stage_spec=[['L'], ['L'], ['L'], ['L']])
    with pytest.raises(ValueError, match='attn_drop'):
        timm.create_model('dat_tiny', device='meta', attn_drop_rate=0.1)
    with pytest.raises(ValueError, match='kind'):
        timm.create_model('dat_tiny', device='meta', stage_spec=[['L', 'X'], ['L', 'S'], ['L', 'D'] * 3, ['L', 'D']])


def test_released_initialisation():
    torch.manual_seed(0)
    model = timm.create_model('dat_tiny', **TINY)
    attn = model.stages[0].blocks[1].attn
    assert 0.007 < attn.relative_position_bias_table.std() < 0.013  # trunc_normal(std=0.01), not Swin's 0.02
    assert attn.qkv.bias.abs().max() > 0  # PyTorch's default init (biases uniform), not Swin's zeros
    assert 0.007 < model.stages[2].blocks[1].attn.rpe_table.std() < 0.013


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = timm.create_model('dat_tiny', drop_path_rate=0., **TINY)
    x = torch.randn(1, 3, 32, 32)
    model(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
