"""ParNet's Skip-Squeeze-Excitation against a float64 reference written from the paper's figure and the released
code (``BN(x) ⊙ σ(W GAP(BN(x)))``), on output and every gradient, at odd sizes and 1×1, in eval (where the module
folds the batch norm into the pooling and the output) and in training (batch statistics); the running statistics,
the gate option, scripting and tracing."""

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.layers import create_feature_extractor

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from test_gating_blocks import _bn, _check_against_reference, _fc, _randomize  # noqa: E402


def ref_sse(x, m, training, bias=False, gate=torch.sigmoid):
    y = _bn(x, m, 'bn', training)  # the skip branch's batch norm
    g = gate(_fc(y.mean((2, 3)), m, 'conv', bias=bias))  # one FC C -> C, no reduction
    return y * g[:, :, None, None]  # the gate multiplies the normalised input


@pytest.mark.parametrize('shape', [(2, 32, 7, 9), (3, 32, 13, 17), (2, 32, 1, 1)])
@pytest.mark.parametrize('training', [False, True])
@pytest.mark.parametrize('bias', [False, True])
def test_reference(shape, training, bias):
    m = visattn.create_attn('parnet', shape[1], bias=bias)
    _check_against_reference(m, lambda x, m: ref_sse(x, m, training, bias), torch.randn(shape), training)


def test_reference_other_gate():
    m = visattn.create_attn('parnet', 16, gate_layer=torch.nn.Hardsigmoid)
    for training in (False, True):
        _check_against_reference(m, lambda x, m, training=training: ref_sse(x, m, training, gate=F.hardsigmoid),
                                 torch.randn(2, 16, 5, 7) * 0.3, training)


def test_gate_multiplies_the_normalised_input():
    """With BN(x) = x + 3 (eval), the output is (x + 3) σ(W (GAP(x) + 3)), not x σ(...)."""
    m = visattn.create_attn('parnet', 8).eval()
    with torch.no_grad():
        m.bn.bias.fill_(3.0)
        m.conv.weight.copy_(torch.randn_like(m.conv.weight))
    x = torch.randn(2, 8, 5, 7)
    y = x * m.bn.weight[:, None, None] / (1 + m.bn.eps) ** 0.5 + 3.0
    gate = torch.sigmoid(y.mean((2, 3)) @ m.conv.weight.flatten(1).T)
    torch.testing.assert_close(m(x), y * gate[:, :, None, None])


def test_running_statistics_as_batch_norm():
    torch.manual_seed(0)
    m = _randomize(visattn.create_attn('parnet', 16)).train()
    bn = torch.nn.BatchNorm2d(16)
    bn.load_state_dict(m.bn.state_dict())
    for _ in range(3):
        x = torch.randn(4, 16, 5, 7) * 2 + 1
        m(x), bn(x)
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(m.bn.state_dict()[key], value)
    m.eval()  # the folded eval path uses those statistics
    x = torch.randn(2, 16, 5, 7)
    y = bn.eval()(x)
    torch.testing.assert_close(m(x), y * torch.sigmoid(y.mean((2, 3)) @ m.conv.weight.flatten(1).T)[:, :, None, None])


def test_defaults_and_registry():
    m = visattn.create_attn('parnet', 64)
    assert m.conv.bias is None and m.conv.weight.shape == (64, 64, 1, 1)  # no reduction, no bias
    assert isinstance(m.gate, torch.nn.Sigmoid)
    meta = visattn.info('parnet')
    assert meta.family == 'channel' and meta.arxiv == '2110.07641'


def test_bad_arguments():
    with pytest.raises(ValueError, match='channels'):
        visattn.create_attn('parnet', 0)
    with pytest.raises(ValueError, match='expected 16'):
        visattn.create_attn('parnet', 16)(torch.randn(1, 8, 3, 3))


@pytest.mark.parametrize('training', [False, True])
def test_scripts_and_traces(training):
    m = _randomize(visattn.create_attn('parnet', 16)).train(training)
    x = torch.randn(2, 16, 5, 7)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit.script is deprecated, not gone
        scripted = torch.jit.script(m)
    want = m(x)
    torch.testing.assert_close(scripted(x), want)
    traced = create_feature_extractor(torch.nn.Sequential(m).train(training), ['0'])  # the block is a leaf
    torch.testing.assert_close(traced(x)['0'], want)
