"""Diverse Branch Block: the training form against the paper's four branches written out (float64, outputs and
gradients, eval and training mode, dense and depthwise forms), and the fusion into one k×k conv (float64 1e-10,
float32 1e-5)."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from visattn.layers import DiverseBranchBlock
from visattn.layers.dbb import IdentityConv1x1

sys.path.insert(0, str(Path(__file__).parent))
from _reparam_ref import bn, check_against, check_fusion, check_scripts, random_block  # noqa: E402

CASES = [dict(), dict(out_channels=12, stride=2, pad_stats='batch'), dict(groups=2, kernel_size=5, stride=2,
         internal_channels=6), dict(groups=8), dict(groups=8, internal_channels=8)]


def padded_bn(u: torch.Tensor, norm, training: bool, pad: int, pad_stats: str) -> torch.Tensor:
    """``BN(u)`` framed by ``pad`` pixels of ``BN(0)``: from the running statistics with γ, β held constant
    (``'running'``), or from the statistics that normalise ``u`` (``'batch'``)."""
    y = bn(u, norm, training)
    if pad_stats == 'batch' and training:
        mean = u.mean((0, 2, 3))
        var = ((u - mean.view(1, -1, 1, 1)) ** 2).mean((0, 2, 3))
        gamma, beta = norm.weight, norm.bias
    else:
        mean, var = norm.running_mean, norm.running_var
        gamma, beta = (norm.weight.detach(), norm.bias.detach()) if pad_stats == 'running' else (norm.weight,
                                                                                                 norm.bias)
    zero = beta - mean * gamma / torch.sqrt(var + norm.eps)
    B, C, H, W = y.shape
    out = zero.view(1, C, 1, 1).repeat(B, 1, H + 2 * pad, W + 2 * pad)
    out[:, :, pad:pad + H, pad:pad + W] = y
    return out


def reference(m: DiverseBranchBlock, x: torch.Tensor, training: bool) -> torch.Tensor:
    """Fig. 1: ``BN(k×k ∗ x) + BN(1×1 ∗ x) + BN(AVG(BN'(1×1 ∗ x))) + BN(k×k ∗ BN'(1×1 ∗ x))``, the inner BN' framed by
    its value at 0 (the released ``BNAndPadLayer``) and the pooling / k×k conv after it unpadded."""
    k, s, g, p = m.kernel_size, m.stride, m.groups, m.kernel_size // 2
    y = bn(F.conv2d(F.pad(x, [p] * 4), m.dbb_origin.conv.weight, stride=s, groups=g), m.dbb_origin.bn, training)
    avg = m.dbb_avg
    if m.dense:
        y = y + bn(F.conv2d(x, m.dbb_1x1.conv.weight, stride=s, groups=g), m.dbb_1x1.bn, training)
        inner = padded_bn(F.conv2d(x, avg.conv.weight, groups=g), avg.bn.bn, training, p, m.pad_stats)
    else:
        inner = F.pad(x, [p] * 4)
    y = y + bn(F.avg_pool2d(inner, k, s), avg.avgbn, training)
    seq = m.dbb_1x1_kxk
    if hasattr(seq, 'idconv1'):
        first = seq.idconv1.weight + torch.eye(m.in_channels // g, dtype=x.dtype).repeat(g, 1)[:, :, None, None]
    else:
        first = seq.conv1.weight
    inner = padded_bn(F.conv2d(x, first, groups=g), seq.bn1.bn, training, p, m.pad_stats)
    return y + bn(F.conv2d(inner, seq.conv2.weight, stride=s, groups=g), seq.bn2, training)


@pytest.mark.parametrize('kwargs', CASES, ids=str)
@pytest.mark.parametrize('training', [False, True])
def test_training_form_is_the_four_branch_sum(kwargs, training):
    m = random_block(DiverseBranchBlock(8, dtype=torch.float64, **kwargs))
    assert hasattr(m.dbb_1x1_kxk, 'idconv1') == (m.internal_channels == 8)
    check_against(m, lambda x, t: reference(m, x, t), torch.randn(2, 8, 7, 9, dtype=torch.float64), training)


@pytest.mark.parametrize('kwargs', CASES, ids=str)
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_deploy_form_equals_training_form(kwargs, dtype, tol):
    m = random_block(DiverseBranchBlock(8, dtype=dtype, **kwargs))
    twin = lambda: DiverseBranchBlock(8, deploy=True, dtype=dtype, **kwargs)  # noqa: E731
    check_fusion(m, torch.randn(2, 8, 7, 9, dtype=dtype), tol, twin)
    assert not list(m.buffers())


def test_deploy_form_equals_training_form_after_training_steps():
    """Running statistics accumulated by training-mode passes (the border value follows them) still fuse exactly."""
    m = random_block(DiverseBranchBlock(8, dtype=torch.float64)).train()
    for _ in range(3):
        m(torch.randn(4, 8, 7, 9, dtype=torch.float64) * 2 + 1)
    check_fusion(m, torch.randn(2, 8, 7, 9, dtype=torch.float64), 1e-10)


def test_identity_based_conv_starts_at_the_identity():
    conv = IdentityConv1x1(8, groups=2)
    x = torch.randn(2, 8, 5, 6)
    torch.testing.assert_close(conv(x), x, rtol=0, atol=0)
    assert [n for n, _ in conv.named_parameters()] == ['weight'] and 'eye' not in conv.state_dict()


def test_parameter_counts_of_both_forms():
    """Per the four branches: k×k (C·O·k²/g) and 1×1 (C·O/g) convs with their norms, 1×1 (C·O/g) – norm – AVG – norm,
    and 1×1 (C·C/g) – norm – k×k (C·O·k²/g) – norm; deployed: one k×k conv with bias."""
    c, o, k, g = 8, 12, 3, 2
    m = DiverseBranchBlock(c, out_channels=o, kernel_size=k, groups=g, device='meta')
    dense = c * o // g * k * k + 2 * o + c * o // g + 2 * o + c * o // g + 4 * o + c * c // g + 2 * c
    dense += c * o // g * k * k + 2 * o
    assert sum(p.numel() for p in m.parameters()) == dense
    m.reparameterize()
    assert sum(p.numel() for p in m.parameters()) == c * o // g * k * k + o
    depthwise = DiverseBranchBlock(c, groups=c, device='meta')  # k×k, AVG – norm, 1×1 (2C, groups C) – norm – k×k
    assert sum(p.numel() for p in depthwise.parameters()) == c * 9 + 2 * c + 2 * c + 2 * c + 4 * c + 2 * c * 9 + 2 * c


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
def test_scripts_in_both_forms():
    check_scripts(random_block(DiverseBranchBlock(8, stride=2)), torch.randn(2, 8, 5, 7))


def test_init_gamma_zeroes_every_branch():
    m = DiverseBranchBlock(8).eval()
    m.init_gamma(0.)
    assert torch.count_nonzero(m(torch.randn(1, 8, 4, 4))) == 0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match='dilation'):
        DiverseBranchBlock(8, dilation=2)
    with pytest.raises(ValueError, match='pad_stats'):
        DiverseBranchBlock(8, pad_stats='zeros')
    with pytest.raises(ValueError, match='depthwise'):
        DiverseBranchBlock(8, out_channels=4, groups=4)
    with pytest.raises(ValueError, match='internal_channels'):
        DiverseBranchBlock(8, groups=2, internal_channels=5)
