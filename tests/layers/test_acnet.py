"""Asymmetric convolution block: the training form against the paper's three-branch sum written out (float64,
outputs and gradients, eval and training mode) and the fusion into one k×k conv (float64 1e-10, float32 1e-5)."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from visattn.layers import AsymConvBlock

sys.path.insert(0, str(Path(__file__).parent))
from _reparam_ref import bn, check_against, check_fusion, check_scripts, random_block  # noqa: E402

CASES = [dict(), dict(out_channels=12, stride=2), dict(groups=2, dilation=2), dict(kernel_size=5, stride=2)]


def reference(m: AsymConvBlock, x: torch.Tensor, training: bool) -> torch.Tensor:
    """Fig. 3: ``BN(k×k ∗ x) + BN(1×k ∗ x) + BN(k×1 ∗ x)``; the 1×k conv sees x padded by ``d·(k//2)`` columns only and
    the k×1 conv by as many rows only, so that all three windows are centred on the same pixel."""
    p = m.dilation * (m.kernel_size // 2)
    conv = dict(stride=m.stride, dilation=m.dilation, groups=m.groups)
    y = bn(F.conv2d(F.pad(x, [p, p, p, p]), m.square_conv.weight, **conv), m.square_bn, training)
    y = y + bn(F.conv2d(F.pad(x, [p, p, 0, 0]), m.hor_conv.weight, **conv), m.hor_bn, training)
    return y + bn(F.conv2d(F.pad(x, [0, 0, p, p]), m.ver_conv.weight, **conv), m.ver_bn, training)


@pytest.mark.parametrize('kwargs', CASES, ids=str)
@pytest.mark.parametrize('training', [False, True])
def test_training_form_is_the_three_branch_sum(kwargs, training):
    m = random_block(AsymConvBlock(8, dtype=torch.float64, **kwargs))
    check_against(m, lambda x, t: reference(m, x, t), torch.randn(2, 8, 7, 9, dtype=torch.float64), training)


@pytest.mark.parametrize('kwargs', CASES, ids=str)
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_deploy_form_equals_training_form(kwargs, dtype, tol):
    m = random_block(AsymConvBlock(8, dtype=dtype, **kwargs))
    twin = lambda: AsymConvBlock(8, deploy=True, dtype=dtype, **kwargs)  # noqa: E731
    check_fusion(m, torch.randn(2, 8, 7, 9, dtype=dtype), tol, twin)


def test_fused_kernel_is_the_skeleton_sum():
    """With the batch norms the identity (γ=1, β=0, μ=0, σ²=1−ε), the deploy kernel is the k×k kernel with the 1×k
    kernel added on its centre row and the k×1 kernel on its centre column (the paper's Fig. 1 "skeleton")."""
    m = AsymConvBlock(4, kernel_size=5, dtype=torch.float64).eval()
    for norm in (m.square_bn, m.hor_bn, m.ver_bn):
        norm.running_var.fill_(1 - norm.eps)
    want = m.square_conv.weight.detach().clone()
    want[:, :, 2, :] += m.hor_conv.weight.detach()[:, :, 0, :]
    want[:, :, :, 2] += m.ver_conv.weight.detach()[:, :, :, 0]
    m.reparameterize()
    torch.testing.assert_close(m.reparam_conv.weight, want, rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(m.reparam_conv.bias) == 0


def test_parameter_counts_of_both_forms():
    """Training form: k² + 2k weights per input-output pair (per group) and three batch norms; deployed: k² weights
    and one bias per output."""
    c, o, k, g = 8, 12, 3, 2
    m = AsymConvBlock(c, out_channels=o, kernel_size=k, groups=g, device='meta')
    assert sum(p.numel() for p in m.parameters()) == o * c // g * (k * k + 2 * k) + 3 * 2 * o
    m.reparameterize()
    assert sum(p.numel() for p in m.parameters()) == o * c // g * k * k + o


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
def test_scripts_in_both_forms():
    check_scripts(random_block(AsymConvBlock(8, stride=2)), torch.randn(2, 8, 5, 7))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match='kernel_size'):
        AsymConvBlock(8, kernel_size=4)
    with pytest.raises(ValueError, match='groups'):
        AsymConvBlock(8, out_channels=6, groups=4)
    with pytest.raises(TypeError, match='deploy'):
        AsymConvBlock(8, deploy=1)
    with pytest.raises(ValueError, match='channels'):
        AsymConvBlock(8)(torch.randn(1, 6, 5, 5))
