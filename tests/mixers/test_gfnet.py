"""GFNet's global filter as a grid mixer (``gfnet``): on the patch tokens it is the 2-D block
(`visattn.layers.gfnet`, itself tested against explicit DFT matrices) with the same weights, outputs and gradients in
float64, at the built grid and at a grid given at forward; the prefix tokens get the filter's zero-frequency
response to the mean patch token, and see nothing else; checkpoints of other grids are interpolated on load; the
ViT model builds and trains."""

import pytest
import timm
import torch

import visattn
from visattn.layers.gfnet import resize_global_filter


def mixer(dim=6, feat_size=(7, 9), prefix=1, **kw):
    m = visattn.create_mixer('gfnet', dim, num_heads=2, feat_size=feat_size, num_prefix_tokens=prefix, **kw)
    with torch.no_grad():
        m.filter.complex_weight.normal_()  # not the tiny init: every frequency matters
    return m.double()


def tokens(block_out, prefix_out):
    """[B, C, H, W] patch map and [B, P, C] prefix -> [B, P + H·W, C]."""
    return torch.cat([prefix_out, block_out.flatten(2).transpose(1, 2)], dim=1)


def reference(m, block, x, H, W):
    """The 2-D block on the patch grid (NCHW), and ``Re K[0, 0] · mean(patch tokens)`` for every prefix token."""
    P = m.num_prefix_tokens
    grid = x[:, P:].transpose(1, 2).reshape(x.shape[0], -1, H, W)
    dc = m.filter.complex_weight[0, 0, :, 0]  # the real part of the zero-frequency entry, per channel
    prefix = (dc * x[:, P:].mean(1))[:, None].expand(-1, P, -1)
    return tokens(block(grid), prefix)


@pytest.mark.parametrize('prefix', [0, 1, 3])
@pytest.mark.parametrize('grid', [None, (5, 4), (13, 17)])
def test_equals_the_2d_block_with_the_same_weights(prefix, grid):
    m = mixer(prefix=prefix)
    block = visattn.create_attn('gfnet', 6, feat_size=(7, 9)).double()
    block.complex_weight = m.filter.complex_weight  # the same weights (one tensor: gradients compare directly)
    H, W = grid or (7, 9)
    x = torch.randn(2, prefix + H * W, 6, dtype=torch.float64, requires_grad=True)
    out = m(x, feat_size=grid)
    want = reference(m, block, x, H, W)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, m.filter.complex_weight], g)
    exp = torch.autograd.grad(want, [x, m.filter.complex_weight], g)
    for name, a, b in zip(['x', 'complex_weight'], got, exp):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f'gradient of {name}')


def test_prefix_tokens_are_the_mean_of_the_filtered_patches_and_are_not_seen():
    """The prefix output is the mean of the filtered patch tokens (the DC identity the docstring states), and the
    prefix tokens' input reaches no output."""
    m = mixer(prefix=2)
    x = torch.randn(3, 2 + 63, 6, dtype=torch.float64)
    out = m(x)
    torch.testing.assert_close(out[:, 0], out[:, 2:].mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[:, 1], out[:, 0], rtol=0, atol=0)
    moved = x.clone()
    moved[:, :2] = 1e3 * torch.randn_like(moved[:, :2])
    torch.testing.assert_close(m(moved), out, rtol=0, atol=0)


def test_checkpoint_of_another_grid_is_interpolated_on_load():
    small = mixer(feat_size=(4, 4))
    big = mixer(feat_size=(7, 9))
    big.load_state_dict(small.state_dict())
    torch.testing.assert_close(big.filter.complex_weight, resize_global_filter(small.filter.complex_weight, 7, 9))
    x = torch.randn(2, 1 + 63, 6, dtype=torch.float64)
    torch.testing.assert_close(big(x), small(x, feat_size=(7, 9)), rtol=1e-12, atol=1e-12)
    same = mixer(feat_size=(4, 5))  # a 4 x 5 grid has the [4, 3] spectrum of 4 x 4: loaded as it is
    same.load_state_dict(small.state_dict())
    assert torch.equal(same.filter.complex_weight, small.filter.complex_weight)
    with pytest.raises(RuntimeError, match='complex_weight'):
        mixer(dim=4).load_state_dict(small.state_dict())


def test_defaults_and_parameters():
    m = visattn.create_mixer('gfnet', 384, num_heads=6, feat_size=14)
    assert [n for n, _ in m.named_parameters()] == ['filter.complex_weight']
    assert m.filter.complex_weight.shape == (14, 8, 384, 2) and m.qkv is None
    meta = visattn.info('mixer:gfnet')
    assert meta.requires_grid and meta.family == 'fourier' and meta.arxiv == '2107.00645'


def test_bf16():
    m = visattn.create_mixer('gfnet', 8, num_heads=2, feat_size=(3, 5))
    x = torch.randn(2, 16, 8)
    y = m.bfloat16()(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), m.float()(x), rtol=0.05, atol=0.02)


def test_vit_model_builds_and_trains():
    model = timm.create_model('vit_small_patch16_224_gfnet', img_size=32, patch_size=8, embed_dim=32, depth=1,
                              num_heads=2, num_classes=4)
    assert model.blocks[0].attn.feat_size == (4, 4)
    out = model(torch.randn(2, 3, 32, 32))
    out.square().sum().backward()
    assert model.blocks[0].attn.filter.complex_weight.grad.abs().sum() > 0
    assert model.cls_token.grad.abs().sum() > 0
