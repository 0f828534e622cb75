"""ShiftViT's shift (``shift``): a reference with explicit index shifting (outputs and input gradients at odd sizes),
the released code's ``shift_feat`` written out, exactly the shifted neighbours moving, the shared helper's border
modes, options and errors."""

import pytest
import torch

import visattn
from visattn._utils import shift_channel_groups
from visattn.layers.shift import shift_mix


def ref_shift(x, g, step):
    """Loop over channels and pixels: out[c, i, j] = x[c, i - dy, j - dx] (0 outside) with (dy, dx) per group."""
    B, C, H, W = x.shape
    offsets = [(0, -step), (0, step), (-step, 0), (step, 0)]
    out = torch.zeros_like(x)
    for c in range(C):
        dy, dx = offsets[c // g] if c < 4 * g else (0, 0)
        for i in range(H):
            for j in range(W):
                si, sj = i - dy, j - dx
                if 0 <= si < H and 0 <= sj < W:
                    out[:, c, i, j] = x[:, c, si, sj]
    return out


def released_shift_feat(x, n_div):
    """microsoft/SPACH ``ShiftViTBlock.shift_feat`` (its slicing written out)."""
    g = x.shape[1] // n_div
    out = torch.zeros_like(x)
    out[:, :g, :, :-1] = x[:, :g, :, 1:]
    out[:, g:2 * g, :, 1:] = x[:, g:2 * g, :, :-1]
    out[:, 2 * g:3 * g, :-1, :] = x[:, 2 * g:3 * g, 1:, :]
    out[:, 3 * g:4 * g, 1:, :] = x[:, 3 * g:4 * g, :-1, :]
    out[:, 4 * g:] = x[:, 4 * g:]
    return out


@pytest.mark.parametrize('hw', [(7, 9), (13, 17), (1, 1), (2, 3)])
@pytest.mark.parametrize('step', [1, 2])
def test_reference(hw, step):
    m = visattn.create_attn('shift', 26, shift_div=1 / 12, step=step)
    assert m.group == 2
    x = torch.randn(2, 26, *hw, dtype=torch.float64, requires_grad=True)
    out, want = m(x), ref_shift(x, 2, step)
    assert torch.equal(out, want)
    g = torch.randn_like(out)
    assert torch.equal(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(want, x, g)[0])


@pytest.mark.parametrize('channels', [96, 100, 12])
def test_matches_released_code(channels):
    x = torch.randn(2, channels, 7, 9)
    assert torch.equal(visattn.create_attn('shift', channels)(x), released_shift_feat(x, 12))


def test_whole_channels_shifted():
    m = visattn.create_attn('shift', 8, shift_div=0.25)
    x = torch.randn(1, 8, 5, 6)
    assert torch.equal(m(x), ref_shift(x, 2, 1))


@pytest.mark.parametrize('c, pos', [(0, (2, 3)), (3, (2, 0)), (5, (0, 4)), (7, (4, 4)), (9, (2, 3)), (1, (2, 0))])
def test_exactly_the_shifted_neighbour_moves(c, pos):
    """A change at one pixel of channel c moves only the output it was shifted to (or nothing, when it is
    shifted out of the map)."""
    m = visattn.create_attn('shift', 10, shift_div=0.2)  # g = 2; channels 8, 9 are not shifted
    x = torch.randn(1, 10, 5, 6)
    x2 = x.clone()
    x2[0, c, pos[0], pos[1]] += 1.0
    moved = (m(x2) - m(x)) != 0
    dy, dx = [(0, -1), (0, 1), (-1, 0), (1, 0), (0, 0)][c // 2]
    want = torch.zeros_like(moved)
    i, j = pos[0] + dy, pos[1] + dx
    if 0 <= i < 5 and 0 <= j < 6:
        want[0, c, i, j] = True
    assert torch.equal(moved, want)


def test_helper_keep_border_and_token_form():
    """The shared helper: with ``keep_border`` the uncovered strip keeps its input; ``channels_last`` is the
    [B, H, W, C] form; offsets wider than the map."""
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    y = shift_channel_groups(x, [0, 1, 2], [(2, 0), (0, -7)], keep_border=True)
    torch.testing.assert_close(y[:, 0, 2:], x[:, 0, :3])
    torch.testing.assert_close(y[:, 0, :2], x[:, 0, :2])
    torch.testing.assert_close(y[:, 1], x[:, 1])  # everything uncovered keeps its value
    torch.testing.assert_close(y[:, 2:], x[:, 2:])
    z = shift_channel_groups(x, [0, 1, 2], [(2, 0), (0, -7)])
    assert (z[:, 0, :2] == 0).all() and (z[:, 1] == 0).all()
    torch.testing.assert_close(shift_mix(x.permute(0, 2, 3, 1), 1, channels_last=True),
                               shift_mix(x, 1).permute(0, 2, 3, 1))


@pytest.mark.parametrize('kwargs, arg', [
    (dict(shift_div=0.3), 'shift_div'),
    (dict(shift_div=0.), 'shift_div'),
    (dict(shift_div=1 / 16), 'shift_div'),  # 8 channels: no channel per direction
    (dict(step=0), 'step'),
])
def test_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        visattn.create_attn('shift', 8, **{'shift_div': 0.25, **kwargs})


def test_defaults_and_bad_input():
    m = visattn.create_attn('shift', 96)
    assert (m.group, m.step) == (8, 1) and not list(m.parameters())
    with pytest.raises(ValueError, match='ShiftMixer'):
        m(torch.randn(1, 95, 4, 4))


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
def test_scripts():
    m = visattn.create_attn('shift', 24, step=2)
    x = torch.randn(2, 24, 5, 7)
    assert torch.equal(torch.jit.script(m)(x), m(x))
