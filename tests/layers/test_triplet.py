"""Triplet attention against a float64 reference written from the paper's equations with the rotations made
explicitly (permuted copies, as the paper's figure and the released code), at odd sizes and 1×1, eval and train, and
its options (kernel size, no_spatial)."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from test_gating_blocks import _bn, _check_against_reference, _p  # noqa: E402


def _rotated_gate(z, m, prefix, training):
    """The gate of one branch on a rotated tensor z [B, P, Q, R]: Z-pool over dim 1 ([max, mean]), k×k conv, BN,
    sigmoid; returns z · gate."""
    pooled = torch.cat([z.max(1, keepdim=True)[0], z.mean(1, keepdim=True)], 1)
    w = _p(m, f'{prefix}.conv.conv.weight')
    logits = _bn(F.conv2d(pooled, w, padding=w.shape[-1] // 2), m, f'{prefix}.conv.bn', training)
    return z * torch.sigmoid(logits)


def ref_triplet(x, m, no_spatial=False, training=False):
    y_cw = _rotated_gate(x.permute(0, 2, 1, 3), m, 'cw', training).permute(0, 2, 1, 3)  # C–W plane, pool over H
    y_hc = _rotated_gate(x.permute(0, 3, 2, 1), m, 'hc', training).permute(0, 3, 2, 1)  # H–C plane, pool over W
    if no_spatial:
        return (y_cw + y_hc) / 2
    return (y_cw + y_hc + _rotated_gate(x, m, 'hw', training)) / 3


@pytest.mark.parametrize('hw', [(7, 9), (13, 17), (1, 1), (1, 6)])
@pytest.mark.parametrize('no_spatial', [False, True])
@pytest.mark.parametrize('training', [False, True])
def test_reference(hw, no_spatial, training):
    m = visattn.create_attn('triplet', 12, no_spatial=no_spatial)
    _check_against_reference(m, lambda x, m: ref_triplet(x, m, no_spatial, training), torch.randn(2, 12, *hw),
                             training)


@pytest.mark.parametrize('kernel_size', [1, 3, 5])
def test_kernel_sizes(kernel_size):
    m = visattn.create_attn('triplet', 8, kernel_size=kernel_size)
    assert m.cw.conv.conv.weight.shape == (1, 2, kernel_size, kernel_size)
    _check_against_reference(m, lambda x, m: ref_triplet(x, m), torch.randn(3, 8, 5, 7))


def test_defaults_and_state_dict():
    m = visattn.create_attn('triplet', 64)
    keys = {f'{b}.conv.{k}' for b in ('cw', 'hc', 'hw') for k in (
        'conv.weight', 'bn.weight', 'bn.bias', 'bn.running_mean', 'bn.running_var', 'bn.num_batches_tracked')}
    assert set(m.state_dict()) == keys  # the released module's names
    assert m.kernel_size == 7 and m.cw.conv.conv.weight.shape == (1, 2, 7, 7) and m.cw.conv.conv.bias is None
    assert all(g.conv.bn.momentum == 0.01 and g.conv.bn.eps == 1e-5 for g in (m.cw, m.hc, m.hw))
    assert sum(p.numel() for p in m.parameters()) == 3 * (2 * 49 + 2)
    assert m.no_spatial is False and m.hw is not None
    small = visattn.create_attn('triplet', 64, no_spatial=True)
    assert small.hw is None and set(small.state_dict()) == {k for k in keys if not k.startswith('hw.')}


def test_running_statistics_use_momentum_001():
    m = visattn.create_attn('triplet', 8, dtype=torch.float64).train()
    x = torch.randn(4, 8, 5, 7, dtype=torch.float64)
    pooled = torch.stack([x.max(2)[0], x.mean(2)], 1)  # the C–W plane: pool over H
    u = F.conv2d(pooled, m.cw.conv.conv.weight, padding=3)
    m(x)
    bn = m.cw.conv.bn
    torch.testing.assert_close(bn.running_mean, 0.01 * u.mean().view(1))
    torch.testing.assert_close(bn.running_var, 0.99 + 0.01 * u.var().view(1))  # unbiased batch variance


def test_bad_arguments():
    with pytest.raises(ValueError, match='kernel_size'):
        visattn.create_attn('triplet', 8, kernel_size=4)


def test_inference_path_and_scripted():
    m = visattn.create_attn('triplet', 16, kernel_size=3)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    m.eval()
    x = torch.randn(2, 16, 5, 7)
    with torch.inference_mode():
        fast = m(x)
    torch.testing.assert_close(fast, m(x.requires_grad_()).detach())
    torch.testing.assert_close(torch.jit.script(m)(x), fast)
    small = visattn.create_attn('triplet', 16, no_spatial=True).eval()
    torch.testing.assert_close(torch.jit.script(small)(x), small(x))
