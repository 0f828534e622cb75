"""gMLP's gated MLP with its spatial gating unit: the paper's equations in float64 (outputs and gradients, causal,
padded), timm's ``SpatialGatingBlock`` and gMLP model with the state dict unchanged, the initialisation, errors."""

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.layers import GatedMlp
from timm.models.mlp_mixer import MlpMixer, SpatialGatingBlock

import visattn
from visattn.mixers import GMLPSpatialGating

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / 'layers'))
from _grid_ref import assert_matches, build  # noqa: E402
from _random_params import randomize  # noqa: E402
from _timm_equal import assert_same_function  # noqa: E402


def _reference(x, m, causal=False, keep=None):
    """``Z = GELU(X U + c)``, ``Z = [Z1, Z2]``, ``s = Z1 ⊙ (W LN(Z2) + b)``, ``Y = s V + d``, with plain matrices per
    sample; W lower-triangular when causal, the columns of hidden tokens zeroed."""
    n = x.shape[1]
    w = m.gate.proj.weight[:n, :n]
    if causal:
        w = torch.tril(w)
    if keep is not None:
        w = w * keep[None, :].to(w.dtype)
    f = m.hidden_features // 2
    outs = []
    for xb in x:
        z = F.gelu(xb @ m.fc1.weight.T + m.fc1.bias)
        z1, z2 = z[:, :f], z[:, f:]
        mu, var = z2.mean(-1, keepdim=True), z2.var(-1, unbiased=False, keepdim=True)
        z2 = (z2 - mu) / torch.sqrt(var + 1e-5) * m.gate.norm.weight + m.gate.norm.bias
        s = z1 * (w @ z2 + m.gate.proj.bias[:n, None])
        outs.append(s @ m.fc2.weight.T + m.fc2.bias)
    return torch.stack(outs)


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('n', [63, 40])
def test_matches_the_paper_equations_float64(causal, n):
    m = build('gmlp', 60, 2, seed=42, seq_len=63, mlp_ratio=1.)
    assert_matches(m, torch.randn(2, n, 60, dtype=torch.float64), lambda t: _reference(t, m, causal),
                   is_causal=causal)


@pytest.mark.parametrize('causal', [False, True])
def test_padding_zeroes_the_hidden_columns_float64(causal):
    m = build('gmlp', 12, 1, seed=42, seq_len=9, mlp_ratio=2.)
    keep = torch.tensor([True, True, False, True, True, True, False, True, True])
    assert_matches(m, torch.randn(2, 9, 12, dtype=torch.float64), lambda t: _reference(t, m, causal, keep),
                   attn_mask=keep[None].expand(2, 9), is_causal=causal)


def _gmlp_model(mlp_layer) -> MlpMixer:
    return MlpMixer(img_size=32, patch_size=8, num_blocks=2, embed_dim=24, mlp_ratio=6, num_classes=5,
                    block_layer=SpatialGatingBlock, mlp_layer=mlp_layer, dtype=torch.float64).eval()


def _ours_as_mlp_layer(dim, hidden_features, act_layer, gate_layer, drop, **dd):
    """timm's ``SpatialGatingBlock`` calls ``mlp_layer(dim, hidden, act_layer=, gate_layer=partial(SGU, seq_len=),
    drop=)``: our mixer takes that place."""
    return GMLPSpatialGating(dim, num_heads=1, seq_len=gate_layer.keywords['seq_len'], hidden_features=hidden_features,
                             act_layer=act_layer, attn_drop=drop, proj_drop=drop, **dd)


def test_replaces_timm_gated_mlp_and_loads_timm_gmlp_unchanged():
    """timm's gMLP (``gmlp_s16_224``'s layout, built locally) with our mixer as its blocks' ``mlp_channels``: timm's
    state dict loads strictly and unchanged, and the logits and the gradients of the input and of every parameter
    agree (float64); likewise one timm ``SpatialGatingBlock`` with the mixer swapped in."""
    torch.manual_seed(42)
    timm_model = randomize(_gmlp_model(GatedMlp), 0.2, lambda name, p: name.endswith('norm.weight'))
    ours = _gmlp_model(_ours_as_mlp_layer)
    assert isinstance(ours.blocks[0].mlp_channels, GMLPSpatialGating)
    assert_same_function(ours, timm_model, torch.randn(2, 3, 32, 32))
    block = copy.deepcopy(timm_model.blocks[0])
    block.mlp_channels = copy.deepcopy(ours.blocks[0].mlp_channels)
    assert_same_function(block, timm_model.blocks[0], torch.randn(2, 16, 24))


def test_initialisation_starts_as_an_ffn():
    """The paper's initialisation: W near 0 and b = 1, so f(Z2) ≈ 1 and the unit passes Z1 (an FFN at first); timm's
    model initialisation keeps it (its ``init_weights`` hook)."""
    m = visattn.create_mixer('gmlp', 16, num_heads=2, seq_len=10)
    assert m.hidden_features == 96 and m.fc2.in_features == 48
    assert torch.equal(m.gate.proj.bias, torch.ones(10)) and m.gate.proj.weight.abs().max() < 1e-4
    sgu = _gmlp_model(_ours_as_mlp_layer).blocks[1].mlp_channels.gate
    assert torch.equal(sgu.proj.bias, torch.ones_like(sgu.proj.bias)) and sgu.proj.weight.abs().max() < 1e-4
    x = torch.randn(2, 10, 16)
    torch.testing.assert_close(m(x), m.fc2(m.act(m.fc1(x))[..., :48]), rtol=1e-4, atol=1e-4)


def test_errors():
    with pytest.raises(ValueError, match='hidden_features'):
        visattn.create_mixer('gmlp', 16, num_heads=2, seq_len=10, hidden_features=7)
    with pytest.raises(ValueError, match='mlp_ratio'):
        visattn.create_mixer('gmlp', 5, num_heads=1, seq_len=10, mlp_ratio=1.)
    m = visattn.create_mixer('gmlp', 16, num_heads=2, seq_len=10)
    with pytest.raises(ValueError, match='seq_len=10'):
        m(torch.randn(1, 11, 16))
