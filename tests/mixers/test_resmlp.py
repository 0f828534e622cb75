"""ResMLP's cross-patch linear: the paper's equation in float64 (outputs and gradients, causal, padded, the paper's
bias), timm's ``ResBlock`` and ResMLP model with the same weights, errors."""

import copy
import re
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock

import visattn
from visattn.mixers import ResMLPCrossPatch
from visattn.models.vit import vit_mixer_layer

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / 'layers'))
from _grid_ref import assert_matches, build  # noqa: E402
from _random_params import randomize  # noqa: E402
from _timm_equal import assert_same_function  # noqa: E402


def _reference(x, weight, bias=None, beta=None, causal=False, keep=None):
    """``Y = A' X (+ b 1ᵀ) (+ 1 βᵀ)`` per sample, A' = A with the entries (i, j) that causality (j > i) or padding
    (token j hidden) forbid set to 0."""
    N = x.shape[1]
    i = torch.arange(N)
    allowed = torch.ones(N, N, dtype=torch.bool)
    if causal:
        allowed &= i[None, :] <= i[:, None]
    if keep is not None:
        allowed &= keep[None, :]
    a = torch.where(allowed, weight, torch.zeros_like(weight))
    y = torch.stack([a @ xb for xb in x])
    if bias is not None:
        y = y + bias[:, None]
    return y if beta is None else y + beta


@pytest.mark.parametrize('causal', [False, True])
def test_matches_the_equation_float64(causal):
    m = build('resmlp', 60, 2, seed=42, seq_len=63)
    n = 41  # shorter than seq_len: the top-left block of A
    assert_matches(m, torch.randn(2, n, 60, dtype=torch.float64),
                   lambda t: _reference(t, m.weight[:n, :n], m.bias[:n], causal=causal), is_causal=causal)


def test_padding_and_the_papers_bias_float64():
    m = build('resmlp', 12, 1, seed=42, seq_len=9, paper_bias=True)
    assert m.bias is None and m.beta.shape == (12,)
    keep = torch.tensor([True, True, False, True, True, True, False, True, True])
    assert_matches(m, torch.randn(2, 9, 12, dtype=torch.float64),
                   lambda t: _reference(t, m.weight, beta=m.beta, keep=keep), attn_mask=keep[None].expand(2, 9))


class _TokenSlot(ResMLPCrossPatch):
    """Our mixer where timm's ``ResBlock`` calls ``linear_tokens``: on the transposed tokens [B, C, N]."""

    def forward(self, xt: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(xt.transpose(1, 2)).transpose(1, 2)


def test_replaces_timm_resblock_linear_tokens():
    """In timm's own ``ResBlock`` (Affine norms, layer scale), our mixer in place of ``linear_tokens``: timm's state
    dict loads strictly (the same keys and shapes), and the outputs and the gradients of the input and of every
    parameter agree (float64)."""
    torch.manual_seed(42)
    dim, seq_len = 24, 15
    timm_block = randomize(ResBlock(dim, seq_len, dtype=torch.float64), 0.3, lambda name, p: name.endswith('alpha'))
    ours = copy.deepcopy(timm_block)
    ours.linear_tokens = _TokenSlot(dim, num_heads=1, seq_len=seq_len, dtype=torch.float64)
    assert_same_function(ours, timm_block, torch.randn(3, seq_len, dim))


def resmlp_to_vit(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ResMLP keys -> a ViT with this mixer, Affine norms and layer scale (the mapping of the docstring)."""
    out = {}
    for k, v in state_dict.items():
        k = k.replace('stem.', 'patch_embed.').replace('.linear_tokens.', '.attn.').replace('.mlp_channels.', '.mlp.')
        out[re.sub(r'\.(ls[12])$', r'.\1.gamma', k)] = v
    return out


def test_timm_resmlp_weights_load_into_a_vit_with_this_mixer():
    """A timm ResMLP (``resmlp_12_224``'s layout, built locally, random weights) loads strictly into a timm ViT with
    ``norm_layer=Affine``, layer scale and this mixer after the documented key mapping; the logits agree (float64)."""
    torch.manual_seed(42)
    kw = dict(img_size=32, patch_size=8, num_classes=5)
    resmlp = MlpMixer(num_blocks=2, embed_dim=24, mlp_ratio=4, block_layer=ResBlock, norm_layer=Affine, **kw)
    resmlp = randomize(resmlp.double().eval(), 0.2, lambda name, p: False)
    vit = timm.models.VisionTransformer(
        embed_dim=24, depth=2, num_heads=2, mlp_ratio=4., class_token=False, pos_embed='none', global_pool='avg',
        fc_norm=False, norm_layer=Affine, init_values=1e-4,
        attn_layer=vit_mixer_layer('resmlp', 32, 8, num_prefix_tokens=0), **kw).double().eval()
    vit.load_state_dict(resmlp_to_vit(resmlp.state_dict()))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(vit(x), resmlp(x), rtol=0, atol=1e-10)


def test_initialisation_and_errors():
    m = visattn.create_mixer('resmlp', 16, num_heads=2, seq_len=30)
    assert m.weight.shape == (30, 30) and m.bias.abs().max() == 0 and 0.01 < m.weight.std() < 0.03
    with pytest.raises(ValueError, match='seq_len=30'):
        m(torch.randn(1, 31, 16))
    with pytest.raises(ValueError, match='seq_len'):
        visattn.create_mixer('resmlp', 16, num_heads=2)
