"""MLP-Mixer's token-mixing MLP: the paper's equation in float64 (outputs and gradients), timm's ``MixerBlock`` and
``MlpMixer`` with the same weights, the shorter-input and key-padding conventions, errors."""

import copy
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.mlp_mixer import MixerBlock, MlpMixer

import visattn
from visattn.mixers import MLPMixerTokenMLP
from visattn.models.vit import vit_mixer_layer

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / 'layers'))
from _grid_ref import assert_matches, build  # noqa: E402
from _random_params import randomize  # noqa: E402
from _timm_equal import assert_same_function  # noqa: E402


def _reference(x: torch.Tensor, m: MLPMixerTokenMLP) -> torch.Tensor:
    """``U = W2 GELU(W1 X + b1 1ᵀ) + b2 1ᵀ`` with X [N, C] as a plain matrix, one sample at a time."""
    n = x.shape[1]
    w1, b1 = m.fc1.weight[:, :n], m.fc1.bias[:, None]
    w2, b2 = m.fc2.weight[:n], m.fc2.bias[:n, None]
    return torch.stack([w2 @ F.gelu(w1 @ xb + b1) + b2 for xb in x])


@pytest.mark.parametrize('n', [63, 40])
def test_matches_the_paper_equation_float64(n):
    m = build('mlp_mixer', 60, 2, seed=42, seq_len=63)
    assert_matches(m, torch.randn(2, n, 60, dtype=torch.float64), lambda t: _reference(t, m))


class _TokenSlot(MLPMixerTokenMLP):
    """Our mixer where timm's ``MixerBlock`` calls ``mlp_tokens``: on the transposed tokens [B, C, N]."""

    def forward(self, xt: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(xt.transpose(1, 2)).transpose(1, 2)


def test_replaces_timm_mixer_block_token_mlp():
    """In timm's own ``MixerBlock``, our mixer in place of ``mlp_tokens``: timm's state dict loads strictly (the
    same keys and shapes), and the outputs and the gradients of the input and of every parameter agree (float64)."""
    torch.manual_seed(42)
    dim, seq_len = 24, 15
    timm_block = randomize(MixerBlock(dim, seq_len, dtype=torch.float64), 0.3, lambda name, p: 'norm' in name)
    ours = copy.deepcopy(timm_block)
    ours.mlp_tokens = _TokenSlot(dim, num_heads=1, seq_len=seq_len, dtype=torch.float64)
    assert_same_function(ours, timm_block, torch.randn(3, seq_len, dim))


def timm_to_vit(state_dict: dict[str, torch.Tensor], token_mixer: str) -> dict[str, torch.Tensor]:
    """timm ``MlpMixer`` keys -> a ViT whose blocks' ``attn`` is our token mixer (the mapping of the docstrings)."""
    out = {}
    for k, v in state_dict.items():
        k = k.replace('stem.', 'patch_embed.').replace(f'.{token_mixer}.', '.attn.').replace('.mlp_channels.', '.mlp.')
        out[k] = v
    return out


def test_timm_mlp_mixer_weights_load_into_a_vit_with_this_mixer():
    """A timm MLP-Mixer (``mixer_b16_224``'s layout, built locally, random weights) loads strictly into a timm ViT
    built with this mixer after the documented key mapping, and computes the same logits (float64)."""
    torch.manual_seed(42)
    kw = dict(img_size=32, patch_size=8, num_classes=5)
    mixer = randomize(MlpMixer(num_blocks=2, embed_dim=24, **kw).double().eval(), 0.2, lambda name, p: False)
    vit = timm.models.VisionTransformer(
        embed_dim=24, depth=2, num_heads=2, mlp_ratio=4., class_token=False, pos_embed='none', global_pool='avg',
        fc_norm=False, attn_layer=vit_mixer_layer('mlp_mixer', 32, 8, num_prefix_tokens=0), **kw).double().eval()
    vit.load_state_dict(timm_to_vit(mixer.state_dict(), 'mlp_tokens'))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(vit(x), mixer(x), rtol=0, atol=1e-10)


def test_trailing_padding_equals_the_shorter_input():
    """A shorter input uses the leading part of the weights, i.e. zero padding; so a key-padding mask that hides the
    last tokens gives, on the visible ones, exactly the mixer of the shorter input."""
    m = build('mlp_mixer', 16, 2, seed=42, seq_len=20)
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[:, 13:] = False
    torch.testing.assert_close(m(x, attn_mask=mask)[:, :13], m(x[:, :13]), rtol=0, atol=1e-12)
    mask[1, 4] = False  # and a hidden token in the middle: its column of W1 contributes nothing
    x2 = x.clone()
    x2[1, 4] = 0.
    torch.testing.assert_close(m(x, attn_mask=mask)[mask], m(x2, attn_mask=mask)[mask], rtol=0, atol=1e-12)


def test_arguments_and_errors():
    m = visattn.create_mixer('mlp_mixer', 32, num_heads=4, seq_len=10)
    assert m.tokens_dim == 16 and m.fc1.weight.shape == (16, 10) and m.fc2.weight.shape == (10, 16)
    assert visattn.create_mixer('mlp_mixer', 32, num_heads=4, seq_len=10, tokens_dim=7).fc1.weight.shape == (7, 10)
    with pytest.raises(ValueError, match='causal'):
        m(torch.randn(1, 10, 32), is_causal=True)
    with pytest.raises(ValueError, match='tokens_mlp_ratio'):
        visattn.create_mixer('mlp_mixer', 4, num_heads=1, seq_len=10, tokens_mlp_ratio=0.1)
    with pytest.raises(ValueError, match='seq_len=10'):
        m(torch.randn(1, 11, 32))
