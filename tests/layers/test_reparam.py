"""`visattn.reparameterize` over a model mixing visattn's four blocks and timm's ``RepVggBlock``, and the shared
kernel algebra of ``visattn.layers._reparam`` against direct convolutions (float64)."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.byobnet import RepVggBlock as TimmRepVggBlock

import visattn
from visattn.layers import AsymConvBlock, DiverseBranchBlock, RepMLPBlock, RepVggBlock
from visattn.layers._reparam import avg_kernel, fuse_bn, identity_kernel, merge_1x1_kxk, pad_kernel

sys.path.insert(0, str(Path(__file__).parent))
from _reparam_ref import random_block  # noqa: E402

F64 = dict(dtype=torch.float64)


def test_reparameterize_converts_every_block_of_a_model():
    model = random_block(nn.Sequential(
        RepVggBlock(8, **F64),
        nn.Sequential(AsymConvBlock(8, **F64), nn.ReLU()),
        DiverseBranchBlock(8, out_channels=12, stride=2, **F64),
        TimmRepVggBlock(12, 12, **F64),
        RepMLPBlock(12, feat_size=(4, 5), partition_size=(2, 3), conv_kernels=(3,), **F64),
        nn.Conv2d(12, 4, 1, **F64),
    ))
    x = torch.randn(2, 8, 7, 9, **F64)
    model.train()
    with torch.no_grad():
        want = model.eval()(x)
    model.train()
    assert visattn.reparameterize(model) is model and not model.training
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-10, atol=1e-10)
    assert all(m.deployed for m in model.modules() if hasattr(m, 'deployed'))
    assert model[3].reparam_conv is not None
    assert not [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    visattn.reparameterize(model)  # already deployed: nothing changes
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-10, atol=1e-10)


def test_reparameterize_refuses_what_it_cannot_convert():
    with pytest.raises(TypeError, match='model'):
        visattn.reparameterize('resnet50_dbb')
    block = RepVggBlock(4)
    block.conv_kxk.bn = nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(ValueError, match='running statistics'):
        block.reparameterize()


def test_kernel_algebra_against_direct_convolutions():
    """Transformations III (1×1 then k×k, with the 1×1's bias seen outside the map), V (average pooling) and VI
    (a 1×3 kernel padded to 3×3) and the grouped identity, each against the convolutions they replace."""
    g, c, m, o = 2, 4, 6, 8
    x = torch.randn(2, c, 7, 9, **F64)
    k1, b1 = torch.randn(m, c // g, 1, 1, **F64), torch.randn(m, **F64)
    k2, b2 = torch.randn(o, m // g, 3, 3, **F64), torch.randn(o, **F64)
    inner = F.conv2d(F.pad(x, [1] * 4), k1, b1, groups=g)  # the 1×1 conv of the zero-padded map: b1 at the border
    want = F.conv2d(inner, k2, b2, groups=g)
    kernel, bias = merge_1x1_kxk(k1, b1, k2, b2, g)
    torch.testing.assert_close(F.conv2d(x, kernel, bias, padding=1, groups=g), want, rtol=1e-12, atol=1e-12)

    pooled = F.avg_pool2d(x, 3, 1, padding=1)  # zero padding counted, as the conv's
    torch.testing.assert_close(F.conv2d(x, avg_kernel(c, 1, 3, **F64), padding=1), pooled, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(F.conv2d(x, avg_kernel(c, c, 3, **F64), padding=1, groups=c), pooled,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(F.conv2d(x, identity_kernel(c, g, 3, **F64), padding=1, groups=g), x, rtol=0, atol=0)
    k13 = torch.randn(o, c, 1, 3, **F64)
    torch.testing.assert_close(F.conv2d(x, pad_kernel(k13, 3), padding=1), F.conv2d(x, k13, padding=(0, 1)),
                               rtol=1e-12, atol=1e-12)
    bn = random_block(nn.BatchNorm2d(o, **F64))
    kernel, bias = fuse_bn(k13, bn)
    torch.testing.assert_close(F.conv2d(x, kernel, bias, padding=(0, 1)), bn(F.conv2d(x, k13, padding=(0, 1))),
                               rtol=1e-12, atol=1e-12)
