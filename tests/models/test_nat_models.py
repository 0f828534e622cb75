"""NAT and DiNAT backbones: parameter counts against the papers' tables, the structure of the released configurations,
the released checkpoint layout (a synthesized state dict, mapped by ``checkpoint_filter_fn``) computing a functional
float64 NAT forward written from the released code's layer order, features, and timm's model API."""

import re

import pytest
import timm
import torch
import torch.nn.functional as F

import visattn  # noqa: F401  (registers the models)
from visattn.layers import NeighborhoodAttnNHWC
from visattn.models.nat import checkpoint_filter_fn, dinat_dilations
from visattn.ops.neighborhood import neighborhood_attention_2d_naive

NAMES = [f'{fam}_{size}' for fam in ('nat', 'dinat') for size in ('mini', 'tiny', 'small', 'base')]
# NAT (arXiv:2204.07143) Table 1 and DiNAT (arXiv:2209.15001) Table 2: 20M / 28M / 51M / 90M, the same for both
PAPER_M = {'mini': 20, 'tiny': 28, 'small': 51, 'base': 90}
EXACT = {'nat_mini': 19_984_174, 'nat_tiny': 27_901_582, 'nat_small': 50_743_297, 'nat_base': 89_769_652,
         'dinat_mini': 19_984_174, 'dinat_tiny': 27_901_582, 'dinat_small': 50_719_681, 'dinat_base': 89_769_652}
TINY = dict(depths=(2, 2, 1, 1), num_heads=(1, 2, 2, 4), embed_dim=16, mlp_ratio=2., layer_scale=0.5,
            dilations=[[1, 2], [1, 2], [1], [1]], num_classes=10)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_papers():
    for name in NAMES:
        n = _count(timm.create_model(name, device='meta'))
        assert round(n / 1e6) == PAPER_M[name.split('_')[1]], (name, n)
        assert n == EXACT[name], (name, n)


def test_released_configurations():
    m = timm.create_model('nat_small', device='meta')
    assert [len(s.blocks) for s in m.stages] == [3, 4, 18, 5]
    assert [s.blocks[0].attn.num_heads for s in m.stages] == [3, 6, 12, 24]
    assert [s.blocks[0].attn.channels for s in m.stages] == [96, 192, 384, 768]
    assert all(b.attn.kernel_size == 7 and b.attn.dilation == 1 for s in m.stages for b in s.blocks)
    assert m.stages[0].blocks[0].mlp.fc1.out_features == 2 * 96
    assert m.stages[0].blocks[0].gamma1.shape == (96,)
    small = timm.create_model('nat_small', depths=(1, 1, 1, 1), embed_dim=8, num_heads=(1, 1, 1, 1))
    assert torch.equal(small.stages[0].blocks[0].gamma2.detach(), torch.full((8,), 1e-5))
    assert abs(m.stages[3].blocks[4].drop_path.drop_prob - 0.3) < 1e-12 and isinstance(
        m.stages[0].blocks[0].drop_path, torch.nn.Identity)  # linear from 0 to drop_path_rate
    conv1, conv2 = m.patch_embed.proj
    assert (conv1.kernel_size, conv1.stride, conv1.out_channels) == ((3, 3), (2, 2), 48)
    assert (conv2.kernel_size, conv2.stride, conv2.out_channels) == ((3, 3), (2, 2), 96)
    down = m.stages[1].downsample
    assert down.reduction.stride == (2, 2) and down.reduction.bias is None and isinstance(down.norm, torch.nn.LayerNorm)
    assert isinstance(m.stages[0].downsample, torch.nn.Identity)
    mini = timm.create_model('nat_mini', device='meta')
    assert mini.stages[0].blocks[0].gamma1 is None and mini.stages[0].blocks[0].mlp.fc1.out_features == 3 * 64
    # the released DiNAT-Small has no layer scale, DiNAT-Base has it
    assert timm.create_model('dinat_small', device='meta').stages[0].blocks[0].gamma1 is None
    assert timm.create_model('dinat_base', device='meta').stages[0].blocks[0].gamma1 is not None


def test_dinat_dilations():
    m = timm.create_model('dinat_tiny', device='meta')
    got = [[b.attn.dilation for b in s.blocks] for s in m.stages]
    assert got == [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]  # the released dinat.py
    assert all(b.attn.kernel_size == 7 for s in m.stages for b in s.blocks)
    # sized for img_size: at 384² DiNAT-L-384's [13, 6, 3, 1]
    assert [max(s) for s in dinat_dilations((3, 4, 18, 5), 384)] == [13, 6, 3, 1]
    m384 = timm.create_model('dinat_mini', device='meta', img_size=384)
    assert [max(b.attn.dilation for b in s.blocks) for s in m384.stages] == [13, 6, 3, 1]
    assert all(b.attn.dilation == 1 for s in timm.create_model('nat_mini', device='meta').stages for b in s.blocks)


def to_released(state_dict: dict) -> dict:
    """Our keys -> the released code's (``levels.i`` closing with its downsampler, a plain ``head``)."""
    out = {}
    for key, value in state_dict.items():
        m = re.match(r'stages\.(\d+)\.(blocks|downsample)\.(.*)', key)
        if m:
            i, part, rest = int(m.group(1)), m.group(2), m.group(3)
            key = f'levels.{i}.blocks.{rest}' if part == 'blocks' else f'levels.{i - 1}.downsample.{rest}'
        elif key.startswith('head.fc.'):
            key = 'head.' + key[len('head.fc.'):]
        out[key] = value
    return out


def _ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[p + '.weight'], sd[p + '.bias'])


def _released_attention(x, sd, p, heads, k, d):
    """NATTEN's NeighborhoodAttention2D (v0.14, as the released NAT): pad to k·d, qkv, attention, crop, proj."""
    B, H, W, C = x.shape
    Hp, Wp = max(H, k * d), max(W, k * d)
    x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
    q, key, v = F.linear(x, sd[p + 'qkv.weight'], sd[p + 'qkv.bias']).reshape(
        B, Hp, Wp, 3, heads, C // heads).permute(3, 0, 4, 1, 2, 5)
    out = neighborhood_attention_2d_naive(q, key, v, k, d, sd[p + 'rpb'], (C // heads) ** -0.5)
    out = out.permute(0, 2, 3, 1, 4).reshape(B, Hp, Wp, C)[:, :H, :W]
    return F.linear(out, sd[p + 'proj.weight'], sd[p + 'proj.bias'])


def released_nat_forward(sd, x, depths, heads, dilations, k=7):
    """The released ``NAT.forward`` written out from its layer order, reading a state dict in its layout."""
    x = F.conv2d(x, sd['patch_embed.proj.0.weight'], sd['patch_embed.proj.0.bias'], stride=2, padding=1)
    x = F.conv2d(x, sd['patch_embed.proj.1.weight'], sd['patch_embed.proj.1.bias'], stride=2, padding=1)
    x = _ln(x.permute(0, 2, 3, 1), sd, 'patch_embed.norm')
    for level, depth in enumerate(depths):
        for j in range(depth):
            p = f'levels.{level}.blocks.{j}.'
            y = _released_attention(_ln(x, sd, p + 'norm1'), sd, p + 'attn.', heads[level], k, dilations[level][j])
            x = x + sd[p + 'gamma1'] * y
            y = F.linear(F.gelu(F.linear(_ln(x, sd, p + 'norm2'), sd[p + 'mlp.fc1.weight'], sd[p + 'mlp.fc1.bias'])),
                         sd[p + 'mlp.fc2.weight'], sd[p + 'mlp.fc2.bias'])
            x = x + sd[p + 'gamma2'] * y
        if level < len(depths) - 1:
            p = f'levels.{level}.downsample.'
            x = F.conv2d(x.permute(0, 3, 1, 2), sd[p + 'reduction.weight'], stride=2, padding=1).permute(0, 2, 3, 1)
            x = _ln(x, sd, p + 'norm')
    x = _ln(x, sd, 'norm').mean((1, 2))
    return F.linear(x, sd['head.weight'], sd['head.bias'])


def _released_state_dict(name='dinat_mini', **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, **{**TINY, **kwargs}).double()
    # random values, LayerNorm weights around 1
    released = {k: torch.randn_like(v) * 0.3 + float('norm' in k.split('.')[-2] and k.endswith('.weight'))
                for k, v in to_released(model.state_dict()).items()}
    return model, released


def test_released_checkpoint_layout_loads_and_computes_nat():
    model, released = _released_state_dict()
    keys = set(released)
    # the released layout: a downsampler closing levels 0-2, none after the last level, a plain Linear head
    assert {'levels.0.downsample.reduction.weight', 'levels.2.downsample.norm.bias', 'levels.3.blocks.0.attn.rpb',
            'levels.0.blocks.1.gamma2', 'patch_embed.proj.1.weight', 'head.weight'} <= keys
    assert not any(k.startswith(('levels.3.downsample', 'stages.')) for k in keys)
    model.load_state_dict(checkpoint_filter_fn({'model': released}, model), strict=True)
    model.eval()
    x = torch.randn(2, 3, 40, 48, dtype=torch.float64)  # maps 10×12 .. 2×2: every stage pads for its dilation
    with torch.no_grad():
        want = released_nat_forward(released, x, TINY['depths'], TINY['num_heads'], TINY['dilations'])
        torch.testing.assert_close(model(x), want, rtol=1e-10, atol=1e-10)
    assert checkpoint_filter_fn(model.state_dict(), model) is not None  # our own layout passes through
    assert set(checkpoint_filter_fn(model.state_dict(), model)) == set(model.state_dict())


def test_released_checkpoint_file_loads_with_pretrained(tmp_path):
    model, released = _released_state_dict('nat_mini', dilations=None)
    path = tmp_path / 'nat_tiny_test.pth'
    torch.save({k: v.float() for k, v in released.items()}, path)
    loaded = timm.create_model('nat_mini', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                               **{**TINY, 'dilations': None})
    for key, value in checkpoint_filter_fn(released, model).items():
        if not key.startswith('head.'):  # timm drops the classifier of a checkpoint for 1000 classes: 10 here
            torch.testing.assert_close(loaded.state_dict()[key], value.float(), rtol=0, atol=0, msg=key)


def test_features_forward_intermediates_and_head():
    model = timm.create_model('dinat_mini', **TINY).eval()
    x = torch.randn(1, 3, 65, 70)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert [tuple(t.shape) for t in inter] == [(1, 16, 17, 18), (1, 32, 9, 9), (1, 64, 5, 5), (1, 128, 3, 3)]
        feats = model.forward_features(x)
        assert feats.shape == (1, 3, 3, 128) and model.output_fmt == 'NHWC'
        torch.testing.assert_close(final, feats)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats.mean((1, 2)))
        features = timm.create_model('dinat_mini', features_only=True, **TINY).eval()
        features.model.load_state_dict(model.state_dict(), strict=False)  # pruned: no head
        outs = features(x)
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert features.feature_info.channels() == [16, 32, 64, 128]
    for a, b in zip(outs, inter):
        torch.testing.assert_close(a, b)


def test_model_api():
    model = timm.create_model('nat_mini', device='meta')
    rpb = model.no_weight_decay()
    assert len(rpb) == 18 and all(n.endswith('attn.rpb') for n in rpb)
    assert set(rpb) <= {n for n, _ in model.named_parameters()}
    from timm.models._manipulate import group_parameters
    groups = group_parameters(model, model.group_matcher(coarse=True))
    assert len(groups) == 6  # stem, 4 stages, head/norm
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7
    assert isinstance(model.stages[1].blocks[0].attn, NeighborhoodAttnNHWC)
    assert model.pretrained_cfg['first_conv'] == 'patch_embed.proj.0'
    with pytest.raises(TypeError):
        timm.create_model('nat_mini', device='meta', not_an_argument=1)
    with pytest.raises(ValueError, match='dilations'):
        timm.create_model('nat_mini', device='meta', dilations=[[1], [1], [1], [1]])


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = timm.create_model('dinat_mini', **TINY)
    x = torch.randn(1, 3, 32, 32)
    model(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_mask_padding_option():
    torch.manual_seed(0)
    zeros = timm.create_model('dinat_mini', **TINY).eval()
    mask = timm.create_model('dinat_mini', pad_mode='mask', **TINY).eval()
    mask.load_state_dict(zeros.state_dict())
    assert all(b.attn.pad_mode == 'mask' for s in mask.stages for b in s.blocks)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(mask(x), zeros(x))
