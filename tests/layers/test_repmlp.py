"""RepMLP block: the training form against the paper's three perceptrons written out partition by partition (float64,
outputs and gradients, eval and training mode), the conv-to-FC conversion, the fusion (float64 1e-10, float32 1e-5),
any input size through padding, and the parameter counts of both forms."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from visattn.layers import RepMLPBlock
from visattn.layers.repmlp import conv_to_fc, convert_official_repmlp

sys.path.insert(0, str(Path(__file__).parent))
from _reparam_ref import bn, check_against, check_fusion, check_scripts, random_block  # noqa: E402

CASES = [
    dict(feat_size=(5, 7), partition_size=(3, 4), conv_kernels=(1, 3)),  # padded to a 2×2 grid
    dict(feat_size=(6, 8), partition_size=(3, 4), conv_kernels=(3, 5), groups=2, out_channels=12, reduction=2),
    dict(feat_size=4, partition_size=5, conv_kernels=(3,)),  # one padded partition: no global perceptron
]


def reference(m: RepMLPBlock, x: torch.Tensor, training: bool) -> torch.Tensor:
    """The paper's block, one partition at a time: the global perceptron adds ``FC₂(ReLU(FC₁(BN(mean of each
    partition))))``, the partition perceptron is a block-diagonal dense matrix (one block per group) then BN,
    the local perceptron convolves each partition alone (zero padding at its border) then BN; the map is zero-
    padded to whole partitions and cropped back."""
    B, C, H, W = x.shape
    h, w = m.partition_size
    nh, nw = -(-H // h), -(-W // w)
    xp = x.new_zeros(B, C, nh * h, nw * w)
    xp[:, :, :H, :W] = x
    cells = [(i, j) for i in range(nh) for j in range(nw)]
    patches = {(i, j): xp[:, :, i * h:(i + 1) * h, j * w:(j + 1) * w] for i, j in cells}
    if m.global_perceptron:
        pooled = torch.stack([torch.stack([patches[i, j].mean((2, 3)) for j in range(nw)], -1) for i in range(nh)],
                             -2)  # [B, C, nh, nw]
        fc1, fc2 = m.fc1_fc2.fc1, m.fc1_fc2.fc2
        v = bn(pooled, m.avg.bn, training).reshape(B, -1)
        v = (torch.relu(v @ fc1.weight.T + fc1.bias) @ fc2.weight.T + fc2.bias).reshape(B, C, nh, nw)
        patches = {(i, j): p + v[:, :, i, j, None, None] for (i, j), p in patches.items()}
    stack = torch.cat([patches[c] for c in cells])  # [nh·nw·B, C, h, w], partition-major
    g = m.groups
    rows = m.fc3.weight.shape[0] // g
    dense = torch.block_diag(*[m.fc3.weight[r * rows:(r + 1) * rows, :, 0, 0] for r in range(g)])
    y = bn(stack.reshape(len(stack), -1) @ dense.T, m.fc3_bn, training)
    for branch in m.local.values():
        k = branch.conv.kernel_size[0]
        z = F.conv2d(F.pad(stack, [k // 2] * 4), branch.conv.weight, groups=g)
        y = y + bn(z, branch.bn, training).reshape(len(stack), -1)
    out = x.new_zeros(B, m.out_channels, nh * h, nw * w)
    for n, (i, j) in enumerate(cells):
        out[:, :, i * h:(i + 1) * h, j * w:(j + 1) * w] = y[n * B:(n + 1) * B].reshape(B, -1, h, w)
    return out[:, :, :H, :W]


@pytest.mark.parametrize('kwargs', CASES, ids=['padded', 'groups', 'single'])
@pytest.mark.parametrize('training', [False, True])
def test_training_form_is_the_three_perceptrons(kwargs, training):
    m = random_block(RepMLPBlock(8, dtype=torch.float64, **kwargs))
    H, W = m.feat_size
    check_against(m, lambda x, t: reference(m, x, t), torch.randn(2, 8, H, W, dtype=torch.float64), training)


@pytest.mark.parametrize('kwargs', CASES, ids=['padded', 'groups', 'single'])
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_deploy_form_equals_training_form(kwargs, dtype, tol):
    m = random_block(RepMLPBlock(8, dtype=dtype, **kwargs))
    twin = lambda: RepMLPBlock(8, deploy=True, dtype=dtype, **kwargs)  # noqa: E731
    check_fusion(m, torch.randn(2, 8, *m.feat_size, dtype=dtype), tol, twin, params=())
    assert m.local is None and m.fc3_bn is None and m.fc3.bias is not None
    assert not [n for n, _ in m.named_modules() if isinstance(_, torch.nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize('groups', [1, 2])
def test_conv_as_fc_is_the_conv(groups):
    """``FC(M) = conv(I, K)``: the FC from `conv_to_fc` applied to flattened maps is the padded conv of the maps."""
    kernel, bias = torch.randn(6, 4 // groups, 3, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    weight, fc_bias = conv_to_fc(kernel, bias, 3, 5, groups)
    x = torch.randn(7, 4, 3, 5, dtype=torch.float64)
    fc = F.conv2d(x.reshape(7, -1, 1, 1), weight, fc_bias, groups=groups).reshape(7, 6, 3, 5)
    torch.testing.assert_close(fc, F.conv2d(x, kernel, bias, padding=1, groups=groups), rtol=1e-12, atol=1e-12)


def test_any_size_of_the_same_grid_and_a_clear_error_otherwise():
    m = random_block(RepMLPBlock(8, feat_size=(5, 7), partition_size=(3, 4), dtype=torch.float64))
    for size in ((4, 5), (6, 8), (5, 7)):
        x = torch.randn(1, 8, *size, dtype=torch.float64)
        torch.testing.assert_close(m(x), reference(m, x, False), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match=r'2×2 grid.*h×w = 7×7 makes a 3×2 grid'):
        m(torch.randn(1, 8, 7, 7))
    single = random_block(RepMLPBlock(8, feat_size=4, partition_size=4, conv_kernels=(3,), dtype=torch.float64))
    x = torch.randn(1, 8, 9, 6, dtype=torch.float64)  # no global perceptron: any grid
    torch.testing.assert_close(single(x), reference(single, x, False), rtol=1e-10, atol=1e-10)


def test_parameter_counts_of_both_forms():
    """FC₃: (C·h·w)(O·h·w)/g weights, BN₁ᵈ 2·O·h·w; each k×k branch O·C·k²/g + 2·O; the global perceptron 2·C (its BN)
    + FC₁ (C·n)² / r + C·n / r + FC₂ likewise + C·n (n partitions). Deployed: FC₃ with O·h·w biases, FC₁, FC₂."""
    c, o, h, w, g, r = 8, 12, 3, 4, 2, 2
    n = 2 * 2
    m = RepMLPBlock(c, out_channels=o, feat_size=(6, 8), partition_size=(h, w), conv_kernels=(1, 3), groups=g,
                    reduction=r, device='meta')
    fc3 = c * h * w * o * h * w // g
    glob = (c * n) ** 2 // r + c * n // r + (c * n) ** 2 // r + c * n
    assert sum(p.numel() for p in m.parameters()) == fc3 + 2 * o * h * w + o * c // g * (1 + 9) + 2 * 2 * o + \
        2 * c + glob
    m.reparameterize()
    assert sum(p.numel() for p in m.parameters()) == fc3 + o * h * w + glob


def test_released_code_keys_are_renamed():
    m = RepMLPBlock(8, feat_size=(6, 8), partition_size=(3, 4), conv_kernels=(1, 3))
    official = {k.replace('local.conv', 'repconv'): v for k, v in m.state_dict().items()}
    assert any(k.startswith('repconv3.') for k in official)
    RepMLPBlock(8, feat_size=(6, 8), partition_size=(3, 4), conv_kernels=(1, 3)).load_state_dict(
        convert_official_repmlp(official), strict=True)


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
def test_scripts_in_both_forms():
    check_scripts(random_block(RepMLPBlock(8, **CASES[0])), torch.randn(2, 8, 5, 7))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match='conv_kernels'):
        RepMLPBlock(8, conv_kernels=(2,))
    with pytest.raises(TypeError, match='conv_kernels'):
        RepMLPBlock(8, conv_kernels=3)
    with pytest.raises(ValueError, match='conv_kernels'):
        RepMLPBlock(8, conv_kernels=(3, 3))
    with pytest.raises(ValueError, match='groups'):
        RepMLPBlock(8, groups=3)
    with pytest.raises(ValueError, match='reduction'):
        RepMLPBlock(1, feat_size=2, partition_size=1, reduction=8)
