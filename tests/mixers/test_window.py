"""The ``window`` grid mixer (Swin window attention over a ViT's patch grid) against a float64 reference written here:
dense attention over all tokens with a "same (shifted) window" mask built from coordinates (the grid cut at s, s + M,
...; an axis not longer than M is one window without shift), Swin's table read at each pair's offset, prefix tokens
global; output and every gradient at odd grids, padded and shifted windows, grids smaller than the window, a grid
given at forward. Then timm's ``WindowAttention`` on timm's partition (and its block's cyclic shift and mask) with the
same state dict, the receptive field, the timm ViT weights of all four grid attention mixers, options and errors."""

import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import swin_transformer as swin

from visattn.models.vit import vit_mixer_layer

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, build, out_proj, qkv, receptive_field, softmax_over, with_prefix  # noqa: E402

C, HEADS = 8, 2


def window_of(coord: torch.Tensor, size: int, M: int, s: int) -> torch.Tensor:
    """The (shifted) window of every coordinate along one axis."""
    return torch.zeros_like(coord) if size <= M else torch.div(coord - s, M, rounding_mode='floor')


def reference(m, x, H, W):
    P, M, s = m.num_prefix_tokens, m.window_size, m.shift_size
    q, k, v = qkv(m, x)
    ys, xs = torch.arange(H).repeat_interleave(W), torch.arange(W).repeat(H)
    wy, wx = window_of(ys, H, M, s), window_of(xs, W, M, s)
    same = (wy[:, None] == wy[None]) & (wx[:, None] == wx[None])
    dy, dx = ys[:, None] - ys[None], xs[:, None] - xs[None]
    row = ((dy + M - 1) * (2 * M - 1) + dx + M - 1).clamp(0, (2 * M - 1) ** 2 - 1)  # exact inside a window
    bias = F.pad(m.relative_position_bias_table[row].permute(2, 0, 1), (P, 0, P, 0))
    return out_proj(m, softmax_over(q, k, v, with_prefix(same, P), m.scale, bias))


CASES = [  # (H, W), window, shift, prefix tokens
    ((7, 9), 3, 0, 1), ((7, 9), 3, 1, 2), ((6, 6), 3, 2, 0), ((4, 5), 7, 3, 1), ((5, 12), 7, 3, 0), ((1, 1), 3, 1, 1),
]


@pytest.mark.parametrize('hw,ws,shift,prefix', CASES, ids=[f'{h}x{w}-ws{m}-s{s}-p{p}' for (h, w), m, s, p in CASES])
def test_matches_reference_output_and_gradients(hw, ws, shift, prefix):
    H, W = hw
    m = build('window', C, HEADS, feat_size=hw, num_prefix_tokens=prefix, window_size=ws, shift_size=shift,
              qkv_bias=True)
    assert_matches(m, torch.randn(2, prefix + H * W, C, dtype=torch.float64), lambda t: reference(m, t, H, W))


def test_other_grid_at_forward_matches_reference():
    m = build('window', C, HEADS, feat_size=(3, 3), num_prefix_tokens=1, window_size=3, shift_size=1)
    assert_matches(m, torch.randn(1, 1 + 8 * 5, C, dtype=torch.float64), lambda t: reference(m, t, 8, 5),
                   feat_size=(8, 5))


class TimmWindows(torch.nn.Module):
    """timm's ``WindowAttention`` on the patch tokens [B, H·W, C]: its block's cyclic shift, partition, mask."""

    def __init__(self, hw, ws, shift):
        super().__init__()
        self.block = swin.SwinTransformerBlock(C, hw, num_heads=HEADS, window_size=ws, shift_size=shift).double()
        self.hw, self.ws, self.shift = hw, ws, shift

    def forward(self, x, params):
        (H, W), M, s = self.hw, self.ws, self.shift
        t = torch.roll(x.view(x.shape[0], H, W, C), (-s, -s), (1, 2))
        windows = swin.window_partition(t, (M, M)).view(-1, M * M, C)
        out = torch.func.functional_call(self.block.attn, params, (windows,), {'mask': self.block.attn_mask})
        t = swin.window_reverse(out.view(-1, M, M, C), (M, M), H, W)
        return torch.roll(t, (s, s), (1, 2)).reshape(x.shape)


@pytest.mark.parametrize('shift', [0, 1])
def test_equals_timm_window_attention(shift):
    """At a grid that is a multiple of the window and without prefix tokens: timm's state dict is ours, and timm's
    module computes the same outputs and gradients (through our parameters) within 1e-10."""
    hw, ws = (6, 9), 3
    m = build('window', C, HEADS, feat_size=hw, num_prefix_tokens=0, window_size=ws, shift_size=shift, qkv_bias=True)
    theirs = TimmWindows(hw, ws, shift)
    theirs.block.attn.load_state_dict(m.state_dict())
    assert (theirs.block.attn_mask is not None) == (shift > 0)
    params = dict(m.named_parameters())
    assert_matches(m, torch.randn(2, 54, C, dtype=torch.float64), lambda t: theirs(t, params))


def test_receptive_field_is_the_shifted_window_and_the_prefix():
    m = build('window', C, HEADS, feat_size=(7, 9), num_prefix_tokens=1, window_size=3, shift_size=1)
    x = torch.randn(1, 64, C, dtype=torch.float64)
    wy, wx = window_of(torch.arange(7), 7, 3, 1), window_of(torch.arange(9), 9, 3, 1)
    for y, xx in ((0, 0), (6, 8), (3, 4), (0, 8)):
        want = {1 + a * 9 + b for a in range(7) for b in range(9) if wy[a] == wy[y] and wx[b] == wx[xx]}
        assert receptive_field(m, x, 1 + y * 9 + xx) == want | {0}
    assert receptive_field(m, x, 0) == set(range(64))


@pytest.mark.parametrize('name', ['na', 'window', 'emsa', 'sra'])
def test_timm_vit_weights_load_into_the_grid_attention_mixers(name):
    """``timm.create_model('vit_small_patch16_224', attn_layer=vit_mixer_layer(...))``: a plain ViT's state dict loads
    with only the mechanism's own parameters missing; every ``qkv`` / ``proj`` tensor is used as it is."""
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    plain = timm.create_model('vit_small_patch16_224', **kw)
    model = timm.create_model('vit_small_patch16_224', attn_layer=vit_mixer_layer(name, 32, 8), **kw)
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith('blocks.0.attn.') for k in missing), missing
    assert not any(k.split('.')[3] in ('qkv', 'proj') for k in missing)
    out = model(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 3) and torch.isfinite(out).all()


def test_bad_arguments_and_refused_calls():
    with pytest.raises(ValueError, match='shift_size'):
        build('window', C, HEADS, feat_size=(4, 4), window_size=3, shift_size=3)
    with pytest.raises(ValueError, match='window_size'):
        build('window', C, HEADS, feat_size=(4, 4), window_size=0)
    m = build('window', C, HEADS, feat_size=(2, 3), num_prefix_tokens=1)
    x = torch.randn(1, 7, C, dtype=torch.float64)
    with pytest.raises(ValueError, match='mask'):
        m(x, attn_mask=torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match='causal'):
        m(x, is_causal=True)
