"""AFNONet: the parameter count of the released configuration, its structure, a state dict in the released layout
(mapped by ``checkpoint_filter_fn``) computing a float64 forward written from the released ``AFNONet`` / ``AFNO2D``
(real and imaginary parts multiplied out as there), other input sizes, features and errors."""

import pytest
import timm
import torch
import torch.nn.functional as F

import visattn  # noqa: F401  (registers the models)
from visattn.layers.afno import AFNO2d
from visattn.models.afnonet import AFNO2dNHWC, AFNONet, checkpoint_filter_fn

TINY = dict(img_size=32, patch_size=4, embed_dim=16, depth=2, num_blocks=4, num_classes=5, drop_path_rate=0.)


def test_parameter_count_and_released_configuration():
    m = timm.create_model('afnonet_ti', device='meta')
    # C = 256, 12 blocks, k = 4, patch 4 (main_afnonet.py), MLP ratio 4: 8,190,696 at 224²; the paper's table
    # could not be read, so this is the released configuration's count
    assert sum(p.numel() for p in m.parameters()) == 8_190_696
    assert m.patch_embed.proj.stride == (4, 4) and m.pos_embed.shape == (1, 56 * 56, 256) and len(m.blocks) == 12
    f = m.blocks[0].filter
    assert isinstance(f, AFNO2dNHWC) and f.num_blocks == 4 and f.w1.shape == (2, 4, 64, 64)
    assert f.sparsity_threshold == 0.01 and f.hard_thresholding_fraction == 1.0
    assert m.blocks[0].mlp.fc1.out_features == 1024 and m.blocks[0].gamma is None
    assert abs(m.blocks[11].drop_path.drop_prob - 0.1) < 1e-12 and m.norm.eps == 1e-6
    assert m.pretrained_cfg['paper_ids'] == 'arXiv:2111.13587'


def _released_afno(x, w1, b1, w2, b2, lam):
    """The released ``AFNO2D.forward`` on [B, H, W, C] (all modes kept), returning ``spectral + x``."""
    B, H, W, C = x.shape
    k, bs = w1.shape[1], w1.shape[2]
    z = torch.fft.rfft2(x, dim=(1, 2), norm='ortho').reshape(B, H, W // 2 + 1, k, bs)

    def mul(a, w):
        return torch.einsum('...bi,bio->...bo', a, w)

    o1r = F.relu(mul(z.real, w1[0]) - mul(z.imag, w1[1]) + b1[0])
    o1i = F.relu(mul(z.imag, w1[0]) + mul(z.real, w1[1]) + b1[1])
    o2r = mul(o1r, w2[0]) - mul(o1i, w2[1]) + b2[0]
    o2i = mul(o1i, w2[0]) + mul(o1r, w2[1]) + b2[1]
    z = F.softshrink(torch.stack([o2r, o2i], -1), lam)
    z = torch.view_as_complex(z.contiguous()).reshape(B, H, W // 2 + 1, C)
    return torch.fft.irfft2(z, s=(H, W), dim=(1, 2), norm='ortho') + x


def released_afnonet(sd, x, depth, lam=0.01):
    """The released ``AFNONet.forward`` (no double skip, eval) from its state dict layout."""
    x = F.conv2d(x, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=4)
    B, C, h, w = x.shape
    x = x.flatten(2).transpose(1, 2) + sd['pos_embed']
    for i in range(depth):
        p = f'blocks.{i}.'
        y = F.layer_norm(x, (C,), sd[p + 'norm1.weight'], sd[p + 'norm1.bias'], eps=1e-6)
        y = _released_afno(y.reshape(B, h, w, C), sd[p + 'filter.w1'], sd[p + 'filter.b1'], sd[p + 'filter.w2'],
                           sd[p + 'filter.b2'], lam).reshape(B, h * w, C)
        y = F.layer_norm(y, (C,), sd[p + 'norm2.weight'], sd[p + 'norm2.bias'], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[p + 'mlp.fc1.weight'], sd[p + 'mlp.fc1.bias'])), sd[p + 'mlp.fc2.weight'],
                     sd[p + 'mlp.fc2.bias'])
        x = x + y
    x = F.layer_norm(x, (C,), sd['norm.weight'], sd['norm.bias'], eps=1e-6).mean(1)
    return F.linear(x, sd['head.weight'], sd['head.bias'])


def test_released_layout_computes_the_released_forward():
    torch.manual_seed(0)
    model = AFNONet(**TINY).double().eval()
    released = {k.replace('head.fc.', 'head.'): torch.randn_like(v) * 0.3 + float(k.endswith('norm1.weight'))
                for k, v in model.state_dict().items()}
    assert {'head.weight', 'pos_embed', 'blocks.1.filter.w2'} <= set(released)
    model.load_state_dict(checkpoint_filter_fn({'model': released}, model))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), released_afnonet(released, x, TINY['depth']), rtol=1e-10, atol=1e-10)


def test_nhwc_mixer_equals_the_block_and_checks_its_input():
    nchw = AFNO2d(16, num_blocks=4).double()
    nhwc = AFNO2dNHWC(16, (5, 7), num_blocks=4).double()
    nhwc.load_state_dict(nchw.state_dict())
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(nhwc(x.permute(0, 2, 3, 1)), nchw(x).permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match=r'\[B, H, W, 16\]'):
        nhwc(x)
    with pytest.raises(ValueError, match='num_blocks'):
        AFNONet(embed_dim=18, num_blocks=4, device='meta')
    with pytest.raises(ValueError, match='img_size'):
        AFNONet(img_size=30, device='meta')


def test_other_sizes_features_and_timm_api():
    x = torch.randn(1, 3, 48, 32)  # 12×8 tokens on a model built for 8×8: the position embedding is resized
    model = AFNONet(**TINY).eval()
    assert model(x).shape == (1, 5) and model.forward_features(x).shape == (1, 12, 8, 16)
    f = timm.create_model('afnonet_ti', features_only=True, embed_dim=16, depth=4, img_size=32)
    assert f.feature_info.reduction() == [4] * 4 and [o.shape for o in f(x)] == [(1, 16, 12, 8)] * 4
    final, inter = model.forward_intermediates(x, indices=[1], norm=True)
    torch.testing.assert_close(inter[0].permute(0, 2, 3, 1), final)
    model.set_grad_checkpointing()
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(RuntimeError, match='No pretrained weights'):
        timm.create_model('afnonet_ti', pretrained=True)
