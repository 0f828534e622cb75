"""GFNet and GFNet-H backbones: parameter counts against the paper's table, the structure of the released
configurations, the released checkpoint layout (a synthesized state dict, mapped by ``checkpoint_filter_fn``)
computing a functional float64 forward written from the released code's order, other input sizes, features."""

import math
import re

import pytest
import timm
import torch
import torch.nn.functional as F

import visattn  # noqa: F401  (registers the models)
from visattn.layers.gfnet import GlobalFilter, GlobalFilterNHWC
from visattn.models.gfnet import GFNet, GFNetH, checkpoint_filter_fn

ISO = ['gfnet_ti', 'gfnet_xs', 'gfnet_s', 'gfnet_b']
HIER = ['gfnet_h_ti', 'gfnet_h_s', 'gfnet_h_b']
# arXiv:2107.00645 Table 2 / the released README: 7M, 16M, 25M, 43M; 15M, 32M, 54M
PAPER_M = {'gfnet_ti': 7, 'gfnet_xs': 16, 'gfnet_s': 25, 'gfnet_b': 43, 'gfnet_h_ti': 15, 'gfnet_h_s': 32,
           'gfnet_h_b': 54}
EXACT = {'gfnet_ti': 7_511_784, 'gfnet_xs': 15_985_768, 'gfnet_s': 24_869_608, 'gfnet_b': 43_120_616,
         'gfnet_h_ti': 15_085_096, 'gfnet_h_s': 32_162_632, 'gfnet_h_b': 53_744_200}
TINY_ISO = dict(img_size=64, embed_dim=16, depth=3, mlp_ratio=2., layer_scale=None, num_classes=7)
TINY_H = dict(img_size=64, embed_dims=(8, 12, 16, 20), depths=(1, 2, 1, 1), mlp_ratio=2., layer_scale=0.5,
              num_classes=7)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_paper():
    for name in ISO + HIER:
        n = _count(timm.create_model(name, device='meta'))
        assert n == EXACT[name], (name, n)
        if name == 'gfnet_ti':  # the released Ti (C = 256, 12 blocks) has 7.51M; the paper prints 7M
            assert math.floor(n / 1e6) == PAPER_M[name], (name, n)
        else:
            assert round(n / 1e6) == PAPER_M[name], (name, n)


def test_released_configurations():
    dims = {'gfnet_ti': (256, 12, 0.), 'gfnet_xs': (384, 12, 0.), 'gfnet_s': (384, 19, .15), 'gfnet_b': (512, 19, .25)}
    for name, (dim, depth, dpr) in dims.items():
        m = timm.create_model(name, device='meta')
        assert len(m.blocks) == depth and m.embed_dim == dim and m.pos_embed.shape == (1, 196, dim)
        assert m.patch_embed.proj.kernel_size == (16, 16) and m.patch_embed.proj.stride == (16, 16)
        blk = m.blocks[-1]
        assert blk.filter.complex_weight.shape == (14, 8, dim, 2) and blk.gamma is None
        assert blk.mlp.fc1.out_features == 4 * dim and isinstance(blk.mlp.act, torch.nn.GELU)
        assert blk.norm1.eps == 1e-6 and m.norm.eps == 1e-6
        assert getattr(blk.drop_path, 'drop_prob', 0.) == pytest.approx(dpr)
    hier = {'gfnet_h_ti': ((64, 128, 256, 512), (3, 3, 10, 3), 1e-3, .1),
            'gfnet_h_s': ((96, 192, 384, 768), (3, 3, 10, 3), 1e-5, .2),
            'gfnet_h_b': ((96, 192, 384, 768), (3, 3, 27, 3), 1e-6, .4)}
    for name, (dims_, depths, gamma, dpr) in hier.items():
        m = timm.create_model(name, device='meta')
        assert [len(s.blocks) for s in m.stages] == list(depths)
        assert [s.blocks[0].filter.complex_weight.shape[:3] for s in m.stages] == [
            (56, 29, dims_[0]), (28, 15, dims_[1]), (14, 8, dims_[2]), (7, 4, dims_[3])]
        assert m.patch_embed.proj.kernel_size == (4, 4) and m.pos_embed.shape == (1, 56 * 56, dims_[0])
        down = m.stages[1].downsample.proj
        assert down.kernel_size == (2, 2) and down.stride == (2, 2) and down.out_channels == dims_[1]
        assert isinstance(m.stages[0].downsample, torch.nn.Identity)
        assert m.stages[3].blocks[-1].drop_path.drop_prob == pytest.approx(dpr)
        assert m.stages[0].blocks[0].gamma.shape == (dims_[0],)
        small = timm.create_model(name, embed_dims=(8, 8, 8, 8), depths=(1, 1, 1, 1))
        assert torch.equal(small.stages[2].blocks[0].gamma.detach(), torch.full((8,), gamma))


def to_released(state_dict: dict) -> dict:
    """Our keys -> the released code's (``patch_embed.i`` and ``blocks.i.j`` for GFNet-H, a plain ``head``)."""
    out = {}
    for key, value in state_dict.items():
        m = re.match(r'stages\.(\d+)\.(blocks|downsample)\.(.*)', key)
        if m:
            i, part, rest = m.group(1), m.group(2), m.group(3)
            key = f'blocks.{i}.{rest}' if part == 'blocks' else f'patch_embed.{i}.{rest}'
        elif key.startswith('patch_embed.') and 'stages.0.blocks.0.norm1.weight' in state_dict:
            key = 'patch_embed.0.' + key[len('patch_embed.'):]
        elif key.startswith('head.fc.'):
            key = 'head.' + key[len('head.fc.'):]
        out[key] = value
    return out


def _randomize(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(42)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def _block(sd: dict, prefix: str, x: torch.Tensor, a: int, b: int, eps: float = 1e-6) -> torch.Tensor:
    """The released ``Block`` / ``BlockLayerScale`` on [B, N, C] tokens of an a×b grid."""
    B, N, C = x.shape
    y = F.layer_norm(x, (C,), sd[prefix + 'norm1.weight'], sd[prefix + 'norm1.bias'], eps)
    y = torch.fft.rfft2(y.view(B, a, b, C), dim=(1, 2), norm='ortho')
    y = y * torch.view_as_complex(sd[prefix + 'filter.complex_weight'].contiguous())
    y = torch.fft.irfft2(y, s=(a, b), dim=(1, 2), norm='ortho').reshape(B, N, C)
    y = F.layer_norm(y, (C,), sd[prefix + 'norm2.weight'], sd[prefix + 'norm2.bias'], eps)
    y = F.linear(F.gelu(F.linear(y, sd[prefix + 'mlp.fc1.weight'], sd[prefix + 'mlp.fc1.bias'])),
                 sd[prefix + 'mlp.fc2.weight'], sd[prefix + 'mlp.fc2.bias'])
    if prefix + 'gamma' in sd:
        y = sd[prefix + 'gamma'] * y
    return x + y


def _head(sd: dict, x: torch.Tensor) -> torch.Tensor:
    x = F.layer_norm(x, x.shape[-1:], sd['norm.weight'], sd['norm.bias'], 1e-6).mean(1)
    return F.linear(x, sd['head.weight'], sd['head.bias'])


def released_gfnet(sd: dict, x: torch.Tensor, depth: int) -> torch.Tensor:
    """The released ``GFNet.forward`` (eval) on a released-layout state dict, at its own resolution."""
    x = F.conv2d(x, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=16)
    a, b = x.shape[2:]
    x = x.flatten(2).transpose(1, 2) + sd['pos_embed']
    for i in range(depth):
        x = _block(sd, f'blocks.{i}.', x, a, b)
    return _head(sd, x)


def released_gfnet_h(sd: dict, x: torch.Tensor, depths) -> torch.Tensor:
    """The released ``GFNetPyramid.forward`` (eval) on a released-layout state dict."""
    for i, depth in enumerate(depths):
        if i == 0:
            x = F.conv2d(x, sd['patch_embed.0.proj.weight'], sd['patch_embed.0.proj.bias'], stride=4)
            a, b = x.shape[2:]
            x = x.flatten(2).transpose(1, 2) + sd['pos_embed']
        else:
            B, N, C = x.shape
            x = x.view(B, a, b, C).permute(0, 3, 1, 2)
            x = F.conv2d(x, sd[f'patch_embed.{i}.proj.weight'], sd[f'patch_embed.{i}.proj.bias'], stride=2)
            a, b = x.shape[2:]
            x = x.flatten(2).transpose(1, 2)
        for j in range(depth):
            x = _block(sd, f'blocks.{i}.{j}.', x, a, b)
    return _head(sd, x)


@pytest.mark.parametrize('cls, kwargs', [(GFNet, TINY_ISO), (GFNetH, TINY_H)])
def test_released_checkpoint_layout_computes_the_released_forward(cls, kwargs):
    src = cls(**kwargs).double().eval()
    _randomize(src)
    released = to_released(src.state_dict())
    if cls is GFNet:
        assert {'patch_embed.proj.weight', 'pos_embed', 'blocks.0.filter.complex_weight', 'head.weight'} <= set(
            released)
    else:
        assert {'patch_embed.0.proj.weight', 'patch_embed.1.proj.weight', 'blocks.1.1.filter.complex_weight',
                'blocks.0.0.gamma', 'head.weight'} <= set(released)
    model = cls(**kwargs).double().eval()
    model.load_state_dict(checkpoint_filter_fn({'model': released}, model))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = released_gfnet(released, x, 3) if cls is GFNet else released_gfnet_h(released, x, TINY_H['depths'])
        torch.testing.assert_close(model(x), ref, rtol=1e-10, atol=1e-10)
    # a state dict in this layout passes unchanged
    assert checkpoint_filter_fn(src.state_dict(), model).keys() == src.state_dict().keys()


def test_checkpoint_from_another_resolution_is_resized_as_the_released_finetuning():
    src = GFNet(**dict(TINY_ISO, img_size=96)).double()
    _randomize(src)
    released = to_released(src.state_dict())
    model = GFNet(**TINY_ISO).double().eval()
    sd = checkpoint_filter_fn(released, model)
    model.load_state_dict(sd)
    w = released['blocks.1.filter.complex_weight']  # [6, 4, C, 2] -> [4, 3, C, 2]
    h, wf, C = w.shape[:3]
    want = F.interpolate(w.reshape(1, h, wf, 2 * C).permute(0, 3, 1, 2), size=(4, 3), mode='bicubic',
                         align_corners=True).permute(0, 2, 3, 1).reshape(4, 3, C, 2)
    torch.testing.assert_close(sd['blocks.1.filter.complex_weight'], want)
    pos = released['pos_embed'].reshape(1, 6, 6, 16).permute(0, 3, 1, 2)
    want = F.interpolate(pos, size=(4, 4), mode='bicubic', align_corners=False).permute(0, 2, 3, 1).reshape(1, 16, 16)
    torch.testing.assert_close(sd['pos_embed'], want)
    # the model at 96² and the model at 64² with the resized weights: the same released computation at 64²
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), released_gfnet(to_released(model.state_dict()), x, 3))


def test_other_input_sizes_resize_filters_and_position_embedding():
    model = GFNet(**TINY_ISO).double().eval()
    _randomize(model)
    x = torch.randn(2, 3, 96, 48, dtype=torch.float64)  # 6×3 tokens on a 4×4 model
    sd = to_released(model.state_dict())
    for key in [k for k in sd if k.endswith('complex_weight')]:
        w = sd[key]
        img = w.reshape(1, 4, 3, -1).permute(0, 3, 1, 2)
        sd[key] = F.interpolate(img, size=(6, 2), mode='bicubic', align_corners=True)[0].permute(1, 2, 0).reshape(
            6, 2, -1, 2)
    pos = sd['pos_embed'].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    sd['pos_embed'] = F.interpolate(pos, size=(6, 3), mode='bicubic', align_corners=False).flatten(2).transpose(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), released_gfnet(sd, x, 3))
    h = GFNetH(**TINY_H).eval()
    assert h(torch.randn(1, 3, 96, 160)).shape == (1, 7)
    assert h.forward_features(torch.randn(1, 3, 96, 160)).shape == (1, 3, 5, 20)


def test_features_only_and_intermediates():
    x = torch.randn(2, 3, 64, 96)
    f = timm.create_model('gfnet_ti', features_only=True, embed_dim=16, depth=12)
    assert f.feature_info.reduction() == [16] * 4 and f.feature_info.channels() == [16] * 4
    assert [i['module'] for i in f.feature_info.get_dicts()] == ['blocks.2', 'blocks.5', 'blocks.8', 'blocks.11']
    assert [o.shape for o in f(x)] == [(2, 16, 4, 6)] * 4
    f = timm.create_model('gfnet_s', features_only=True, embed_dim=16, out_indices=(1, 3))
    assert [o.shape for o in f(x)] == [(2, 16, 4, 6)] * 2 and len(f.model.blocks) == 4  # pruned after block 3
    f = timm.create_model('gfnet_h_ti', features_only=True, embed_dims=(8, 12, 16, 20), depths=(1, 1, 1, 1))
    assert [tuple(o.shape) for o in f(x)] == [(2, 8, 16, 24), (2, 12, 8, 12), (2, 16, 4, 6), (2, 20, 2, 3)]
    for model in (GFNet(**TINY_ISO).eval(), GFNetH(**TINY_H).eval()):
        final, inter = model.forward_intermediates(x)
        assert len(inter) == len(model.feature_info)
        torch.testing.assert_close(final, model.forward_features(x))
        with pytest.raises(ValueError, match='output_fmt'):
            model.forward_intermediates(x, output_fmt='NLC')
    model = GFNet(**TINY_ISO).eval()
    _, (last,) = model.forward_intermediates(x, indices=[2], norm=True)
    torch.testing.assert_close(last.permute(0, 2, 3, 1), model.forward_features(x))


def test_global_filter_nhwc_and_errors():
    gf = GlobalFilter(8, feat_size=(6, 6)).double()
    nhwc = GlobalFilterNHWC(8, feat_size=(6, 6)).double()
    nhwc.load_state_dict(gf.state_dict())
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(nhwc(x.permute(0, 2, 3, 1)), gf(x).permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match=r'\[B, H, W, 8\]'):
        nhwc(x)
    with pytest.raises(ValueError, match='img_size'):
        GFNet(img_size=100, device='meta')
    with pytest.raises(ValueError, match='img_size'):
        GFNetH(img_size=240, device='meta')
    with pytest.raises(ValueError, match='embed_dims'):
        GFNetH(embed_dims=(8, 8), device='meta')


def test_timm_api():
    model = timm.create_model('gfnet_ti', embed_dim=16, depth=2, num_classes=3)
    assert model.no_weight_decay() == {'pos_embed'}
    model.reset_classifier(0, '')
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2, 2, 16)
    model.set_grad_checkpointing()
    model.train()
    model.reset_classifier(4, 'avg')
    model(torch.randn(2, 3, 32, 48)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert timm.create_model('gfnet_h_ti', device='meta').pretrained_cfg['paper_ids'] == 'arXiv:2107.00645'
    with pytest.raises(RuntimeError, match='No pretrained weights'):
        timm.create_model('gfnet_ti', pretrained=True)
