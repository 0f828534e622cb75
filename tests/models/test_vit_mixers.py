"""ViT-S/16 mixer backbones (pretrained loading from a local file, fixed lengths) and the 2-D mixer adapter."""

import math

import pytest
import timm
import torch
from safetensors.torch import save_file

import visattn
from visattn.layers.mixer2d import MixerAttn2d, sincos_2d

SMALL = dict(depth=2)  # two blocks: the same names and shapes as ViT-S/16, built quickly


@pytest.fixture(scope='module')
def vit_small_file(tmp_path_factory):
    torch.manual_seed(0)
    source = timm.create_model('vit_small_patch16_224', **SMALL)
    path = tmp_path_factory.mktemp('weights') / 'vit_small_patch16_224.safetensors'
    save_file(source.state_dict(), str(path))
    return path, source.state_dict()


@pytest.mark.parametrize('mixer', ['performer', 'gqa', 'fnet'])
def test_pretrained_loads_matching_weights_and_keeps_mixer_parameters_fresh(vit_small_file, mixer):
    path, source = vit_small_file
    name = f'vit_small_patch16_224_{mixer}'
    torch.manual_seed(1)
    fresh = timm.create_model(name, **SMALL).state_dict()
    torch.manual_seed(1)
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SMALL)
    own = loaded.state_dict()
    matching = [k for k in own if k in source and source[k].shape == own[k].shape]
    assert 'patch_embed.proj.weight' in matching and 'blocks.1.mlp.fc2.weight' in matching
    for k in matching:
        assert torch.equal(own[k], source[k]), k
    for k in set(own) - set(matching):  # the mixer's own tensors: as a model built without weights
        assert torch.equal(own[k], fresh[k]), k
    if mixer == 'performer':  # timm's layout: the attention projections load too
        assert 'blocks.0.attn.qkv.weight' in matching and 'blocks.0.attn.projection' not in matching
    if mixer == 'gqa':  # a narrower qkv does not fit and stays fresh
        assert 'blocks.0.attn.qkv.weight' not in matching and 'blocks.0.attn.proj.weight' in matching


def test_pretrained_resizes_position_embedding(vit_small_file):
    path, source = vit_small_file
    model = timm.create_model('vit_small_patch16_224_linformer', pretrained=True, img_size=64,
                              pretrained_cfg_overlay=dict(file=str(path)), **SMALL)
    assert model.pos_embed.shape == (1, 17, 384)
    assert torch.equal(model.pos_embed[:, 0], source['pos_embed'][:, 0])  # class token position kept
    assert torch.equal(model.blocks[0].attn.qkv.weight, source['blocks.0.attn.qkv.weight'])


def test_pretrained_cfg_points_at_timm_vit_small_weights():
    cfg = timm.create_model('vit_small_patch16_224_full', device='meta', **SMALL).pretrained_cfg
    assert cfg['hf_hub_id'] == 'timm/vit_small_patch16_224.augreg_in21k_ft_in1k'


@pytest.mark.parametrize('img_size, expected', [(224, 197), (64, 17), (96, 37)])
def test_fixed_length_mixers_get_the_token_count(img_size, expected):
    model = timm.create_model('vit_small_patch16_224_aft_full', img_size=img_size, device='meta', **SMALL)
    assert model.blocks[0].attn.seq_len == expected
    model = timm.create_model('vit_small_patch16_224_linformer', img_size=img_size, class_token=False,
                              global_pool='avg', device='meta', **SMALL)
    assert model.blocks[0].attn.seq_len == expected - 1


def test_full_mixer_vit_equals_timm_vit():
    ours = timm.create_model('vit_small_patch16_224_full', img_size=32, **SMALL).eval()
    theirs = timm.create_model('vit_small_patch16_224', img_size=32, **SMALL).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def _sincos_reference(h: int, w: int, c: int) -> torch.Tensor:
    q = c // 4
    pe = torch.zeros(h * w, c, dtype=torch.float64)
    for y in range(h):
        for x in range(w):
            for i in range(q):
                omega = 10000. ** (-i / q)
                pe[y * w + x, i] = math.sin(y * omega)
                pe[y * w + x, q + i] = math.cos(y * omega)
                pe[y * w + x, 2 * q + i] = math.sin(x * omega)
                pe[y * w + x, 3 * q + i] = math.cos(x * omega)
    return pe


@pytest.mark.parametrize('h, w, c', [(3, 5, 16), (4, 4, 10)])
def test_sincos_2d_matches_formula(h, w, c):
    torch.testing.assert_close(sincos_2d(h, w, c, dtype=torch.float64), _sincos_reference(h, w, c))


def test_adapter_full_equals_plain_composition():
    block = visattn.create_attn('mixer:full', 16, dtype=torch.float64)
    assert isinstance(block, MixerAttn2d) and block.mixer_name == 'full'
    x = torch.randn(2, 16, 5, 3, dtype=torch.float64)
    t = torch.nn.functional.layer_norm(x.flatten(2).transpose(1, 2), (16,)) + _sincos_reference(5, 3, 16)
    heads = block.mixer.num_heads
    q, k, v = (block.mixer.qkv(t).reshape(2, 15, 3, heads, 16 // heads).permute(2, 0, 3, 1, 4))
    attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(16 // heads), dim=-1)
    y = block.mixer.proj((attn @ v).transpose(1, 2).reshape(2, 15, 16))
    torch.testing.assert_close(block(x), x + y.transpose(1, 2).reshape(2, 16, 5, 3))


@pytest.mark.parametrize('mixer', ['performer', 'linear', 'nystrom', 'xca'])
def test_adapter_any_size_forward_backward(mixer):
    block = visattn.create_attn(f'mixer:{mixer}', 24)
    x = torch.randn(2, 24, 7, 9, requires_grad=True)
    out = block(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in block.parameters())


def test_adapter_class_names_and_errors():
    cls = visattn.get_attn('mixer:performer')
    assert issubclass(cls, MixerAttn2d) and cls is visattn.get_attn('mixer:performer')
    assert 'mixer' in visattn.list_attn() and visattn.info('attn:mixer').family == 'mixer-adapter'
    with pytest.raises(visattn.UnknownNameError, match="Unknown token mixer 'nope'"):
        visattn.create_attn('mixer:nope', 8)
    with pytest.raises(ValueError, match='feat_size'):
        visattn.create_attn('mixer:linformer', 8)
    block = visattn.create_attn('mixer:linformer', 8, feat_size=(4, 5), k=8)
    assert block(torch.randn(1, 8, 4, 5)).shape == (1, 8, 4, 5)
    with pytest.raises(ValueError, match='channels'):
        block(torch.randn(1, 9, 4, 5))


def test_adapter_in_a_timm_resnet():
    model = timm.create_model('resnet18', num_classes=4, block_args=dict(attn_layer=visattn.get_attn('mixer:linear')))
    assert type(model.layer1[0].se).__name__ == 'MixerAttn2dLinear'
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
