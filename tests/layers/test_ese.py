"""eSE (CenterMask's effective Squeeze-Excitation) against a float64 reference written from the paper's equation
with the released code's hard-sigmoid gate, and against timm's ``EffectiveSEModule`` with the same weights."""

import sys
import warnings
from pathlib import Path

import pytest
import torch
from timm.layers.squeeze_excite import EffectiveSEModule

import visattn
from visattn.layers.ese import HardSigmoid

sys.path.insert(0, str(Path(__file__).parent))
from _timm_equal import assert_same_function  # noqa: E402
from test_gating_blocks import _check_against_reference, _fc, _randomize  # noqa: E402


def hard_sigmoid(t):
    return ((t + 3) / 6).clamp(0, 1)  # ReLU6(t + 3) / 6, the released code's Hsigmoid


def ref_ese(x, m, gate=hard_sigmoid):
    """``x ⊙ σ_h(W GAP(x) + b)``: one C → C fully connected layer, no reduction."""
    return x * gate(_fc(x.mean((2, 3)), m, 'fc'))[:, :, None, None]


@pytest.mark.parametrize('hw', [(7, 9), (13, 17), (1, 1)])
@pytest.mark.parametrize('scale', [1., 30.])  # at scale 30 many logits leave [-3, 3]: the gate saturates at 0 and 1
def test_reference(hw, scale):
    _check_against_reference(visattn.create_attn('ese', 32), ref_ese, scale * torch.randn(2, 32, *hw))


def test_gate_saturates_where_the_reference_says():
    m = _randomize(visattn.create_attn('ese', 32).double())
    x = 30 * torch.randn(2, 32, 5, 7, dtype=torch.float64)
    gate = m(x) / x
    assert (gate == 0).any() and (gate == 1).any() and ((gate > 0) & (gate < 1)).any()


def _assert_same_function(ours, theirs, x, grad_tol=1e-10):
    """Output and the gradients of x and of every parameter agree in float64, with theirs' weights in ours."""
    assert_same_function(ours, theirs, x, grad_tol=grad_tol)


@pytest.mark.parametrize('gate', [None, 'sigmoid'])
def test_matches_timm(gate):
    """timm's default gate is ``nn.Hardsigmoid``: the same values, but its backward multiplies by 1/6 rounded to
    float32 (relative error 3e-8, also in float64), hence the looser gradient tolerance there."""
    kw = {} if gate is None else dict(gate_layer=gate)
    theirs = _randomize(EffectiveSEModule(64, **kw))
    _assert_same_function(visattn.create_attn('ese', 64, **kw), theirs, 10 * torch.randn(2, 64, 7, 9),
                          grad_tol=1e-7 if gate is None else 1e-10)


def test_torch_hardsigmoid_backward_is_float32_accurate():
    """Why the default gate is `HardSigmoid` (ReLU6(t + 3) / 6, as the released code) and not ``nn.Hardsigmoid``:
    the latter's float64 gradient is 1/6 rounded to float32. If PyTorch fixes it, this fails and either will do."""
    t = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    (torch_grad,) = torch.autograd.grad(torch.nn.functional.hardsigmoid(t).sum(), t)
    (ours,) = torch.autograd.grad(HardSigmoid()(t).sum(), t)
    assert ours[0].item() == 1 / 6 and torch_grad[0].item() != 1 / 6


@pytest.mark.parametrize('gate', [torch.nn.Sigmoid, 'sigmoid'])
def test_gate_layer(gate):
    m = visattn.create_attn('ese', 32, gate_layer=gate)
    _check_against_reference(m, lambda x, m: ref_ese(x, m, torch.sigmoid), torch.randn(2, 32, 7, 9))


def test_one_fc_without_reduction():
    m = visattn.create_attn('ese', 48)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {'fc.weight': (48, 48, 1, 1), 'fc.bias': (48,)}


def test_scripts():
    m = _randomize(visattn.create_attn('ese', 16)).eval()
    x = torch.randn(2, 16, 5, 7)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        scripted = torch.jit.script(m)
    torch.testing.assert_close(scripted(x), m(x))
