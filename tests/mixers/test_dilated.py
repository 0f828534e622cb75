"""``dilated`` ("Transformer on a Diet", 2002.06170) against a float64 reference: the released code's masks, written
here as its loops (query i sees ``i, i - d, ..., i - (k - 1)·d`` with ``d = base^l``; the memory variant accumulates
the masks of layers ``0 .. l``; the symmetric form is the mask or its transpose); outputs and every gradient,
padding; which outputs a perturbed token moves; the receptive field of stacked layers; dilations past N."""

import sys
from pathlib import Path

import pytest
import torch

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from _pattern_ref import assert_same_function, moved_rows, pattern_attention, sees  # noqa: E402

B, C, H = 2, 24, 3


def make(**kw) -> torch.nn.Module:
    torch.manual_seed(42)
    return visattn.create_mixer('dilated', C, num_heads=H, dtype=torch.float64, **kw).eval()


def released_mask(n: int, k: int, base: int, layer: int, memory: bool, causal: bool) -> torch.Tensor:
    mask = torch.zeros(n, n, dtype=torch.bool)
    for ell in range(layer + 1) if memory else [layer]:
        d = base ** ell
        for i in range(n - 1, -1, -1):
            end = i
            mask[i, end] = True
            for _ in range(k - 1):
                end = end - d
                if end < 0:
                    break
                mask[i, end] = True
    return mask if causal else mask | mask.T


@pytest.mark.parametrize('kw,causal', [
    (dict(), True), (dict(layer_idx=2), True), (dict(layer_idx=2), False), (dict(layer_idx=3, memory=True), True),
    (dict(kernel_size=4, dilation_base=3, layer_idx=1, memory=True), False), (dict(layer_idx=40), False)])
def test_matches_the_released_masks(kw, causal):
    m = make(**kw)
    torch.manual_seed(42)
    x = torch.randn(B, 37, C, dtype=torch.float64)
    kpm = torch.rand(B, 37) > 0.25
    mask = released_mask(37, m.kernel_size, m.dilation_base, m.layer_idx, m.memory, causal)
    allowed = mask[None, None] & kpm[:, None, None, :]
    assert_same_function(m, x, lambda t: pattern_attention(m, t, allowed), dict(attn_mask=kpm, is_causal=causal))


def test_a_token_moves_exactly_the_outputs_that_see_it():
    m = make(layer_idx=2)
    torch.manual_seed(42)
    x = torch.randn(1, 30, C, dtype=torch.float64)
    allowed = released_mask(30, 3, 2, 2, False, False)[None, None]
    for j in (0, 13, 29):
        assert torch.equal(moved_rows(m, x, j), sees(allowed, j))


def test_stacked_layers_see_the_dilated_receptive_field():
    """Layers 0 .. L-1 (dilations 1, 2, 4, 8; k = 3) chain to the ``(k - 1)·(2^L - 1) + 1`` previous tokens."""
    n, layers = 40, 4
    stack = [make(layer_idx=ell) for ell in range(layers)]
    torch.manual_seed(42)
    x = torch.randn(1, n, C, dtype=torch.float64, requires_grad=True)
    y = x
    for m in stack:
        y = m(y, is_causal=True)
    y[0, -1].sum().backward()
    assert (x.grad[0].abs().amax(-1) > 0).nonzero().flatten().tolist() == list(range(n - 1 - 2 * (2 ** layers - 1), n))
