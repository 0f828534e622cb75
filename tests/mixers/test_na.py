"""The ``na`` grid mixer (NAT / DiNAT neighbourhood attention over a ViT's patch grid) against a float64 reference
written here: NATTEN's windows found by brute force per axis (the k consecutive members of the query's residue class
that contain it, as centred as the border allows; the whole class on an axis shorter than k·dilation), the bias read
at the offset in window steps, prefix tokens global, one dense masked softmax; output and every gradient, with and
without prefix tokens, small grids, any tile size of the PyTorch path. Then every tile's key band against the
brute-force windows, the 2-D block with the same weights, the receptive field, TorchScript, options and errors."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from visattn.layers import NeighborhoodAttnNHWC
from visattn.mixers.na import axis_tiles

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import (  # noqa: E402
    assert_matches,
    assert_scripts,
    build,
    out_proj,
    qkv,
    receptive_field,
    softmax_over,
    with_prefix,
)

C, HEADS = 8, 2


def natten_window(i: int, length: int, k: int, d: int) -> list[int]:
    """Key positions of query ``i`` along one axis, by brute force over every placement of the window in ``i``'s
    residue class: the placement that contains ``i`` and is closest to centred on it."""
    members = list(range(i % d, length, d))
    if len(members) < k:
        return members
    c = members.index(i)
    starts = [s for s in range(len(members) - k + 1) if s <= c < s + k]
    best = min(starts, key=lambda s: abs(s + k // 2 - c))
    return members[best:best + k]


def reference(m, x, H, W):
    P, k, d = m.num_prefix_tokens, m.kernel_size, m.dilation
    q, key, v = qkv(m, x)
    pairs = []  # (query patch, key patch, bias row, bias column)
    for y in range(H):
        for xx in range(W):
            for ky in natten_window(y, H, k, d):
                for kx in natten_window(xx, W, k, d):
                    pairs.append((y * W + xx, ky * W + kx, (ky - y) // d + k - 1, (kx - xx) // d + k - 1))
    a, b, ry, rx = torch.tensor(pairs).unbind(1)
    patch = torch.zeros(H * W, H * W, dtype=torch.bool)
    patch[a, b] = True
    bias = None
    if m.rpb is not None:
        bias = torch.zeros(HEADS, H * W, H * W, dtype=x.dtype)
        bias[:, a, b] = m.rpb[:, ry, rx]
        bias = F.pad(bias, (P, 0, P, 0))
    return out_proj(m, softmax_over(q, key, v, with_prefix(patch, P), m.scale, bias))


CASES = [  # (H, W), kernel_size, dilation, prefix tokens, rel_pos_bias
    ((7, 9), 3, 1, 0, True),
    ((7, 9), 3, 2, 0, False),
    ((7, 9), 3, 1, 1, True),  # dense, with a class token
    ((9, 7), 3, 2, 2, True),
    ((5, 7), 7, 1, 1, True),  # smaller than the window: the whole grid
    ((9, 4), 3, 2, 0, True),  # W < k·d: residue classes along W
    ((1, 1), 3, 1, 1, True),
]


@pytest.mark.parametrize('hw,ks,dil,prefix,rpb', CASES, ids=[f'{h}x{w}-k{k}-d{d}-p{p}' + ('' if b else '-nobias')
                                                              for (h, w), k, d, p, b in CASES])
def test_matches_reference_output_and_gradients(hw, ks, dil, prefix, rpb):
    H, W = hw
    m = build('na', C, HEADS, feat_size=hw, num_prefix_tokens=prefix, kernel_size=ks, dilation=dil,
              rel_pos_bias=rpb, qkv_bias=True)
    assert_matches(m, torch.randn(2, prefix + H * W, C, dtype=torch.float64), lambda t: reference(m, t, H, W))


@pytest.mark.parametrize('tile', [1, 3, 5])
def test_any_tile_size_matches_reference(tile):
    """Tiles smaller than the window and a last tile that runs past the grid give the same function."""
    m = build('na', C, HEADS, feat_size=(13, 11), num_prefix_tokens=1, kernel_size=5, dilation=2)
    m.tile = tile
    x = torch.randn(1, 1 + 13 * 11, C, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), reference(m, x, 13, 11), rtol=1e-10, atol=1e-10)


def test_every_window_lies_in_its_tiles_key_band():
    """`axis_tiles` against the brute-force windows for every length up to 17, k in (1, 3, 5, 7), dilation 1-3 and
    tiles (1, 2, 3, 5, 8): each query's ``inside`` keys are exactly its window."""
    for length in range(1, 18):
        for k in (1, 3, 5, 7):
            for d in (1, 2, 3):
                for tile in (1, 2, 3, 5, 8):
                    keys, inside, _ = axis_tiles(length, k, d, tile, torch.device('cpu'))
                    keys, inside = keys.tolist(), inside.tolist()
                    for i in range(length):
                        t, a = divmod(i, tile)
                        got = sorted(j for j, ok in zip(keys[t], inside[t][a]) if ok)
                        assert got == natten_window(i, length, k, d), (length, k, d, tile, i)


def test_other_grid_at_forward_matches_reference():
    m = build('na', C, HEADS, feat_size=(4, 4), num_prefix_tokens=1, kernel_size=3)
    assert_matches(m, torch.randn(1, 1 + 6 * 5, C, dtype=torch.float64), lambda t: reference(m, t, 6, 5),
                   feat_size=(6, 5))


@pytest.mark.parametrize('hw,ks,dil', [((7, 9), 3, 2), ((5, 7), 7, 1)])
def test_equals_the_2d_block_without_prefix_tokens(hw, ks, dil):
    """The block `NeighborhoodAttnNHWC` (``pad_mode='mask'``) loads the mixer's state dict and computes the same on
    the patch tokens (7×9; and the padded, masked small grid: 5×7 with k = 7)."""
    m = build('na', C, HEADS, feat_size=hw, num_prefix_tokens=0, kernel_size=ks, dilation=dil, qkv_bias=True)
    block = NeighborhoodAttnNHWC(C, num_heads=HEADS, kernel_size=ks, dilation=dil, pad_mode='mask',
                                 dtype=torch.float64).eval()
    block.load_state_dict(m.state_dict())
    x = torch.randn(2, hw[0] * hw[1], C, dtype=torch.float64)
    torch.testing.assert_close(m(x), block(x.view(2, *hw, C)).flatten(1, 2), rtol=1e-12, atol=1e-12)


def test_receptive_field_is_the_window_and_the_prefix():
    m = build('na', C, HEADS, feat_size=(7, 9), num_prefix_tokens=2, kernel_size=3, dilation=2)
    x = torch.randn(1, 2 + 63, C, dtype=torch.float64)
    for y, xx in ((0, 0), (6, 8), (3, 1)):
        want = {2 + ky * 9 + kx for ky in natten_window(y, 7, 3, 2) for kx in natten_window(xx, 9, 3, 2)}
        assert receptive_field(m, x, 2 + y * 9 + xx) == want | {0, 1}
    assert receptive_field(m, x, 1) == set(range(65))  # a prefix token sees everything


def test_torchscript_matches_eager():
    m = build('na', C, HEADS, feat_size=(7, 9), num_prefix_tokens=0, kernel_size=3, dilation=2).float()
    assert_scripts(m, torch.randn(2, 63, C))
    assert_scripts(m, torch.randn(1, 42, C), feat_size=(6, 7))


def test_attention_dropout_in_training_only():
    m = build('na', C, HEADS, feat_size=(7, 9), num_prefix_tokens=0, kernel_size=3, attn_drop=0.5).float()
    x = torch.randn(2, 63, C)
    with torch.no_grad():
        ref = m(x)
        m.train()
        torch.manual_seed(1)
        dropped = m(x)
    assert torch.isfinite(dropped).all() and not torch.allclose(dropped, ref, atol=1e-4)


def test_bf16_computes_in_float32():
    m = build('na', C, HEADS, feat_size=(7, 9), num_prefix_tokens=0, kernel_size=3).float()
    x = torch.randn(2, 63, C)
    out = m.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), m.float()(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize('kwargs,match', [
    (dict(kernel_size=4), 'kernel_size'), (dict(dilation=0), 'dilation'), (dict(kernel_size=3, dilation='x'),
                                                                             'dilation')])
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build('na', C, HEADS, feat_size=(4, 4), **kwargs)


def test_masks_and_causality_are_refused():
    m = build('na', C, HEADS, feat_size=(2, 3), num_prefix_tokens=1)
    x = torch.randn(1, 7, C, dtype=torch.float64)
    with pytest.raises(ValueError, match='mask'):
        m(x, attn_mask=torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match='causal'):
        m(x, is_causal=True)


def test_fused_op_path_equals_the_tiled_path():
    """The fused op's path (taken on CUDA; here its PyTorch implementation) and the tiled path compute the same."""
    m = build('na', C, HEADS, feat_size=(7, 9), num_prefix_tokens=0, kernel_size=3, dilation=2)
    q, k, v = (torch.randn(2, HEADS, 63, C // HEADS, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(m.fused_attention(q, k, v, 7, 9), m.tiled_attention(q, k, v, 7, 9, 0.),
                               rtol=1e-12, atol=1e-12)
