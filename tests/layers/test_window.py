"""Swin window attention (``window``) and Swin V2's (``window_v2``) against float64 references written from the papers:
dense attention over every pair of pixels of the map with a "same (shifted) window" mask built here from coordinates
and the relative bias looked up by offset; output and every gradient, at odd sizes, 1×1 and maps smaller than the
window, with and without shift. Then the receptive field, timm's modules with the same weights, V2's logit clamp and
continuous bias, the options, bf16, TorchScript / fx and bad arguments."""

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.layers import create_feature_extractor
from timm.models import swin_transformer as tv1
from timm.models import swin_transformer_v2 as tv2

import visattn
from visattn.layers import WindowAttn, WindowAttnV2

sys.path.insert(0, str(Path(__file__).parent))
from _random_params import randomize  # noqa: E402

C, HEADS = 8, 2
BLOCKS = {'window': WindowAttn, 'window_v2': WindowAttnV2}


def _block(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    m = BLOCKS[name](C, num_heads=HEADS, dtype=torch.float64, **kwargs)
    return randomize(m, 0.4, lambda n, p: False).eval()


# ----- the reference: dense attention over the whole map, float64 -----

def _window_index(coord, size, M, s):
    """The (shifted) window of every coordinate along an axis: the grid cut at s, s + M, s + 2M, ...; an axis not
    longer than the window is one window and is not shifted (Swin's rule)."""
    if size <= M:
        return torch.zeros_like(coord)
    return torch.div(coord - s, M, rounding_mode='floor')


def _log_coords(delta, M, pretrained):
    """Swin V2's log-spaced offsets, float32 as the released code: sign(t)·log2(1 + |t|)/log2(8), t = 8Δ/(M' - 1)."""
    t = delta.float() / max((pretrained or M) - 1, 1) * 8
    return (torch.sign(t) * torch.log2(t.abs() + 1) / math.log2(8)).double()


def reference(m, x):
    """y = proj(softmax_j(logit_ij, j in the window of i) v_j) over all H·W pixels, the logits of Swin (q·k/√d + B̂ at
    the offset) or Swin V2 (cos(q, k)·min(e^s, 100) + 16σ(MLP(log-spaced offset)))."""
    P = dict(m.named_parameters())
    B, _, H, W = x.shape
    M, s, N, d = m.window_size, m.shift_size, m.num_heads, C // m.num_heads
    tok = x.flatten(2).transpose(1, 2)  # [B, HW, C]
    ys = torch.arange(H).repeat_interleave(W)
    xs = torch.arange(W).repeat(H)
    wy, wx = _window_index(ys, H, M, s), _window_index(xs, W, M, s)
    same = (wy[:, None] == wy[None]) & (wx[:, None] == wx[None])  # [HW, HW]
    dy, dx = ys[:, None] - ys[None], xs[:, None] - xs[None]
    inside = dy.abs().lt(M) & dx.abs().lt(M)
    assert bool(inside[same].all())
    wq, wk, wv = P['qkv.weight'].split(C)

    def heads(t):
        return t.view(B, H * W, N, d).transpose(1, 2)  # [B, N, HW, d]

    if isinstance(m, WindowAttnV2):
        q = heads(tok @ wq.T + (P['q_bias'] if 'q_bias' in P else 0))
        k = heads(tok @ wk.T)
        v = heads(tok @ wv.T + (P['v_bias'] if 'v_bias' in P else 0))
        cos = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
        scale = torch.exp(torch.clamp(P['logit_scale'], max=math.log(100)))  # [N, 1, 1]
        # the MLP at every offset (dy, dx) of the map, [2H - 1, 2W - 1, N], then read at each pair's offset
        oy, ox = torch.meshgrid(torch.arange(1 - H, H), torch.arange(1 - W, W), indexing='ij')
        coords = torch.stack([_log_coords(oy, M, m.pretrained_window_size),
                              _log_coords(ox, M, m.pretrained_window_size)], -1)
        hidden = torch.relu(coords @ P['cpb_mlp.0.weight'].T + P['cpb_mlp.0.bias'])
        table = 16 * torch.sigmoid(hidden @ P['cpb_mlp.2.weight'].T)
        bias = table[dy + H - 1, dx + W - 1].permute(2, 0, 1)  # [N, HW, HW]
        logits = cos * scale + bias
    else:
        bq, bk, bv = P['qkv.bias'].split(C) if 'qkv.bias' in P else (0, 0, 0)
        q, k, v = heads(tok @ wq.T + bq), heads(tok @ wk.T + bk), heads(tok @ wv.T + bv)
        row = ((dy + M - 1) * (2 * M - 1) + dx + M - 1).clamp(0, (2 * M - 1) ** 2 - 1)
        bias = P['relative_position_bias_table'][row].permute(2, 0, 1)
        logits = q @ k.transpose(-1, -2) * d ** -0.5 + bias
    attn = torch.softmax(logits.masked_fill(~same, float('-inf')), -1)
    out = (attn @ v).transpose(1, 2).reshape(B, H * W, C)
    y = out @ P['proj.weight'].T + P['proj.bias']
    return y.transpose(1, 2).reshape(B, C, H, W)


def _grads(fn, m, x, g):
    params = dict(m.named_parameters())
    xi = x.detach().clone().requires_grad_()
    y = fn(xi)
    return y, dict(zip(['x', *params], torch.autograd.grad((y * g).sum(), [xi, *params.values()])))


def assert_matches(m, x, want_fn, tol=1e-10):
    g = torch.randn(x.shape, dtype=torch.float64)
    y, got = _grads(m, m, x, g)
    want, exp = _grads(want_fn, m, x, g)
    torch.testing.assert_close(y, want, rtol=tol, atol=tol)
    for name in exp:
        torch.testing.assert_close(got[name], exp[name], rtol=tol, atol=tol, msg=f'gradient of {name}')
    with torch.no_grad():  # the fused SDPA path (no autograd) computes the same
        torch.testing.assert_close(m(x), want, rtol=tol, atol=tol)


CASES = [  # (H, W), window, shift
    ((7, 9), 3, 0), ((7, 9), 3, 1), ((7, 9), 7, 3), ((13, 17), 4, 2), ((1, 1), 3, 1), ((4, 5), 7, 3),
    pytest.param((13, 17), 5, 0, marks=pytest.mark.slow), pytest.param((13, 17), 5, 4, marks=pytest.mark.slow),
    pytest.param((5, 12), 7, 3, marks=pytest.mark.slow),  # one side shorter than the window: no shift along it
]
CASE_IDS = ['7x9-ws3', '7x9-ws3-s1', '7x9-ws7-s3', '13x17-ws4-s2', '1x1-ws3-s1', '4x5-ws7-s3', '13x17-ws5',
            '13x17-ws5-s4', '5x12-ws7-s3']


@pytest.mark.parametrize('name', BLOCKS)
@pytest.mark.parametrize('hw,ws,shift', CASES, ids=CASE_IDS)
def test_matches_dense_reference(name, hw, ws, shift):
    m = _block(name, window_size=ws, shift_size=shift)
    x = torch.randn(2, C, *hw, dtype=torch.float64)
    assert_matches(m, x, lambda t: reference(m, t))


@pytest.mark.parametrize('name', BLOCKS)
def test_options_match_the_reference(name):
    kwargs = dict(qkv_bias=False) if name == 'window' else dict(qkv_bias=False, pretrained_window_size=12)
    m = _block(name, window_size=4, shift_size=2, **kwargs)
    assert not any('bias' in n and 'proj' not in n and 'cpb' not in n and 'table' not in n
                   for n, _ in m.named_parameters())
    assert_matches(m, torch.randn(1, C, 9, 11, dtype=torch.float64), lambda t: reference(m, t))


# ----- receptive field -----

def _moved(m, x, i, j):
    x2 = x.clone()
    x2[:, :, i, j] += 1.0
    with torch.no_grad():
        return (m(x2) - m(x)).abs().sum((0, 1)) > 0  # [H, W]


def _piece(coord, size, M, s):
    """The coordinates that share the (shifted) window of ``coord`` along an axis of ``size``."""
    idx = _window_index(torch.arange(size), size, M, s)
    return idx == idx[coord]


@pytest.mark.parametrize('name', BLOCKS)
@pytest.mark.parametrize('pos', [(5, 3), (0, 0), (11, 13), (9, 1)])
def test_receptive_field(name, pos):
    """Without shift exactly the window of the pixel moves; with shift the shifted window that holds it, which crosses
    the unshifted borders, and, for a pixel of a wrapped region, not the other regions its rolled window holds."""
    H, W, M, s = 12, 14, 4, 2
    x = torch.randn(1, C, H, W, dtype=torch.float64)
    for shift in (0, s):
        m = _block(name, window_size=M, shift_size=shift)
        moved = _moved(m, x, *pos)
        want = _piece(pos[0], H, M, shift)[:, None] & _piece(pos[1], W, M, shift)[None, :]
        assert torch.equal(moved, want), (shift, moved.nonzero().tolist())
        if shift and pos == (5, 3):  # rows 2..5 and columns 2..5: across the unshifted borders at 4
            unshifted = _piece(pos[0], H, M, 0)[:, None] & _piece(pos[1], W, M, 0)[None, :]
            assert (moved & ~unshifted).any() and (unshifted & ~moved).any()
        if shift and pos == (0, 0):  # the wrapped corner region is 2×2; its rolled window also holds the far border
            assert int(moved.sum()) == s * s


def test_padded_keys_are_masked_and_zeros_mode_lets_them_in():
    """'mask': a border window's output is that of the map cropped to the window's pixels; 'zeros' differs there."""
    x = torch.randn(1, C, 5, 5, dtype=torch.float64)
    masked, zeros = _block('window', window_size=3), _block('window', window_size=3, pad_mode='zeros')
    with torch.no_grad():
        corner = masked(x)[:, :, 3:, 3:]
        torch.testing.assert_close(corner, masked(x[:, :, 3:, 3:].contiguous()))  # 2×2: one window of its size
        assert not torch.allclose(zeros(x)[:, :, 3:, 3:], corner)
        torch.testing.assert_close(zeros(x)[:, :, :3, :3], masked(x)[:, :, :3, :3])  # a window without padding


# ----- timm -----

class TimmWindows(torch.nn.Module):
    """timm's window attention composed from its own functions: its cyclic shift (``torch.roll``), zero padding,
    ``window_partition``, its ``WindowAttention`` with the block's mask, ``window_reverse``, the roll back; timm's
    block rolls then pads, ``pad_first`` pads then rolls (the released detection code). [B, C, H, W] in and out."""

    def __init__(self, attn, mod, window, shift=0, mask=None, pad_first=False):
        super().__init__()
        self.attn, self.mod, self.window, self.shift = attn, mod, window, shift
        self.mask, self.pad_first = mask, pad_first

    def forward(self, x):
        (wh, ww), s = self.window, self.shift
        H, W = x.shape[-2:]
        t = x.permute(0, 2, 3, 1)
        pad = (0, 0, 0, -W % ww, 0, -H % wh)
        t = F.pad(t, pad) if self.pad_first else t
        t = torch.roll(t, (-s, -s), (1, 2)) if s else t
        t = t if self.pad_first else F.pad(t, pad)
        Hp, Wp = t.shape[1:3]
        out = self.attn(self.mod.window_partition(t, (wh, ww)).view(-1, wh * ww, C), mask=self.mask)
        out = out.view(-1, wh, ww, C)
        if self.mod is tv1:
            t = tv1.window_reverse(out, (wh, ww), Hp, Wp)
        else:
            t = tv2.window_reverse(out, (wh, ww), (Hp, Wp))
        t = t if self.pad_first else t[:, :H, :W]
        t = torch.roll(t, (s, s), (1, 2)) if s else t
        return (t[:, :H, :W] if self.pad_first else t).permute(0, 3, 1, 2)


def _timm_block(name, hw, ws, shift, **kwargs):
    if name == 'window':
        return tv1.SwinTransformerBlock(C, hw, num_heads=HEADS, window_size=ws, shift_size=shift).double(), tv1
    blk = tv2.SwinTransformerV2Block(C, hw, num_heads=HEADS, window_size=ws, shift_size=shift, **kwargs)
    return blk.double(), tv2


def _with_our_params(wrapper, params):
    """``wrapper`` called with its attention's parameters replaced by ``params`` (so autograd reaches ours)."""
    named = {f'attn.{n}': p for n, p in params.items()}
    return lambda t: torch.func.functional_call(wrapper, named, (t,))


@pytest.mark.parametrize('name', BLOCKS)
@pytest.mark.parametrize('hw,shift', [((14, 21), 0), ((14, 21), 3), ((7, 7), 0)])
def test_equals_timm_window_attention(name, hw, shift):
    """timm's WindowAttention on timm's window partition (its block's cyclic shift and mask for SW-MSA), at
    multiples of the window: our state dict is timm's; output and every gradient within 1e-10."""
    ws = 7
    m = _block(name, window_size=ws, shift_size=shift)
    blk, mod = _timm_block(name, hw, ws, shift)
    blk.attn.load_state_dict(m.state_dict())
    m.load_state_dict(blk.attn.state_dict())
    assert dict(blk.attn.named_parameters()).keys() == dict(m.named_parameters()).keys()
    assert (blk.attn_mask is not None) == (shift > 0)
    wrapper = TimmWindows(blk.attn, mod, (ws, ws), shift, blk.attn_mask)
    x = torch.randn(2, C, *hw, dtype=torch.float64)
    assert_matches(m, x, _with_our_params(wrapper, dict(m.named_parameters())))


@pytest.mark.parametrize('name', BLOCKS)
@pytest.mark.parametrize('shift', [0, 3])
def test_zeros_mode_equals_zero_padding(name, shift):
    """``pad_mode='zeros'`` at a size that is not a multiple of the window: timm's zero padding without shift; with
    shift the released detection code's order (pad, then roll; the mask of the padded size, timm's block's)."""
    ws, hw = 7, (10, 12)
    m = _block(name, window_size=ws, shift_size=shift, pad_mode='zeros')
    blk, mod = _timm_block(name, hw, ws, shift)  # its mask is built for the padded 14×14
    wrapper = TimmWindows(blk.attn, mod, (ws, ws), shift, blk.attn_mask, pad_first=True)
    x = torch.randn(2, C, *hw, dtype=torch.float64)
    assert_matches(m, x, _with_our_params(wrapper, dict(m.named_parameters())))
    wrapper.pad_first = False  # timm's block: roll, then pad
    if shift == 0:  # without shift the order does not matter
        assert_matches(m, torch.randn(1, C, *hw, dtype=torch.float64),
                       _with_our_params(wrapper, dict(m.named_parameters())))
    else:  # its mask (for the padded map) no longer matches the rolled, unpadded map: columns 10, 11 see 0, 1
        with torch.no_grad():
            x = torch.randn(1, C, *hw, dtype=torch.float64)
            assert not torch.allclose(_with_our_params(wrapper, dict(m.named_parameters()))(x), m(x))


@pytest.mark.parametrize('name', BLOCKS)
def test_map_smaller_than_window_equals_timm_shrunk_window(name):
    """A 4×5 map with window 7 and shift 3: timm's block shrinks the window to 4×5 and drops the shift; our table is
    read at the same offsets (V2: the MLP normalised by the configured window, timm's pretrained_window_size=7)."""
    hw, ws = (4, 5), 7
    m = _block(name, window_size=ws, shift_size=3)
    blk, mod = _timm_block(name, hw, ws, 3, **({} if name == 'window' else dict(pretrained_window_size=ws)))
    assert blk.window_size == hw and blk.shift_size == (0, 0)
    params = dict(m.named_parameters())
    if name == 'window':  # timm's 7×9 table holds the offsets |dy| < 4, |dx| < 5 of ours (13×13)
        dy, dx = torch.meshgrid(torch.arange(-3, 4), torch.arange(-4, 5), indexing='ij')
        rows = ((dy + ws - 1) * (2 * ws - 1) + dx + ws - 1).reshape(-1)
        params['relative_position_bias_table'] = params['relative_position_bias_table'][rows]
    wrapper = TimmWindows(blk.attn, mod, hw)
    assert_matches(m, torch.randn(2, C, *hw, dtype=torch.float64), _with_our_params(wrapper, params))


# ----- Swin V2 specifics -----

def test_v2_logit_scale_is_clamped_at_log_100():
    m = _block('window_v2', window_size=3, shift_size=1)
    with torch.no_grad():
        m.logit_scale.copy_(torch.tensor([math.log(1000.), math.log(5.)]).view(2, 1, 1))
    x = torch.randn(1, C, 7, 9, dtype=torch.float64)
    assert_matches(m, x, lambda t: reference(m, t))
    with torch.no_grad():
        y = m(x)
        m.logit_scale[0] = math.log(100.) + 2.
        torch.testing.assert_close(m(x), y, rtol=0, atol=0)  # anything above the clamp is the clamp
        m.logit_scale[0] = math.log(100.) - 0.5
        assert not torch.allclose(m(x), y)
        m.logit_scale[0] = math.log(1000.)
    (grad,) = torch.autograd.grad(m(x.requires_grad_()).square().sum(), m.logit_scale)
    assert grad[0].item() == 0 and grad[1].item() != 0


def test_v2_continuous_bias_at_another_window_size():
    """A 5×5 window with an MLP pretrained at 8×8: offsets normalised by 7 (as timm's pretrained_window_size), not by
    4; equal to timm's V2 WindowAttention and to the reference, and different from the bias normalised by 4."""
    m = _block('window_v2', window_size=5, pretrained_window_size=8)
    own = _block('window_v2', window_size=5)
    x = torch.randn(2, C, 10, 15, dtype=torch.float64)
    assert_matches(m, x, lambda t: reference(m, t))
    attn = tv2.WindowAttention(C, (5, 5), HEADS, pretrained_window_size=(8, 8)).double()
    assert_matches(m, x, _with_our_params(TimmWindows(attn, tv2, (5, 5)), dict(m.named_parameters())))
    with torch.no_grad():
        assert not torch.allclose(m.relative_position_bias(5, 5), own.relative_position_bias(5, 5))
    assert WindowAttnV2(C, num_heads=2, pretrained_window_size=0).pretrained_window_size == 0  # timm's "none"


# ----- options, dtypes, export, errors -----

@pytest.mark.parametrize('name', BLOCKS)
def test_attention_dropout(name):
    m = _block(name, window_size=3, shift_size=1, attn_drop=0.5)
    x = torch.randn(2, C, 7, 9, dtype=torch.float64)
    with torch.no_grad():
        ref = m(x)
        m.train()
        for grad in (False, True):  # the fused path and the autograd path both drop
            with torch.set_grad_enabled(grad):
                assert not torch.allclose(m(x), ref)
        m.eval()
        torch.testing.assert_close(m(x), ref)


@pytest.mark.parametrize('name', BLOCKS)
def test_bf16(name):
    torch.manual_seed(0)
    m = BLOCKS[name](C, num_heads=HEADS, window_size=3, shift_size=1)
    x = torch.randn(2, C, 7, 9)
    with torch.no_grad():
        want = m(x)
        got = m.to(torch.bfloat16)(x.bfloat16())
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize('name', BLOCKS)
def test_scripts_and_is_an_fx_leaf(name):
    m = visattn.create_attn(name, C, num_heads=HEADS, window_size=3, shift_size=1)
    x = torch.randn(2, C, 5, 7)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit.script is deprecated, not gone
        scripted = torch.jit.script(m)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            want = m(x)
            torch.testing.assert_close(scripted(x), want)
            traced = create_feature_extractor(torch.nn.Sequential(m), ['0'])
            torch.testing.assert_close(traced(x)['0'], want)


def test_registry_metadata():
    for name, cls in BLOCKS.items():
        info = visattn.info(name)
        assert visattn.get_attn(name) is cls and info.family == 'local'
    assert visattn.info('window').arxiv == '2103.14030' and visattn.info('window_v2').arxiv == '2111.09883'


@pytest.mark.parametrize('name', BLOCKS)
@pytest.mark.parametrize('kwargs,error,words', [
    (dict(window_size=7, shift_size=7), ValueError, ['shift_size', '[0, 6]', 'got 7']),
    (dict(window_size=3, shift_size=5), ValueError, ['shift_size', 'got 5']),
    (dict(shift_size=-1), ValueError, ['shift_size', 'got -1']),
    (dict(num_heads=3), ValueError, ['num_heads', 'channels=8', 'got num_heads=3']),
    (dict(window_size=0), ValueError, ['window_size', 'got 0']),
    (dict(window_size=2.5), TypeError, ['window_size', '2.5']),
    (dict(pad_mode='same'), ValueError, ['pad_mode', "'same'"]),
    (dict(attn_drop=1.5), ValueError, ['attn_drop', 'got 1.5']),
])
def test_bad_arguments(name, kwargs, error, words):
    with pytest.raises(error) as err:
        BLOCKS[name](C, **{'num_heads': HEADS, **kwargs})
    assert all(w in str(err.value) for w in words), str(err.value)


def test_bad_pretrained_window_size():
    with pytest.raises(ValueError, match='pretrained_window_size.*got -1'):
        WindowAttnV2(C, num_heads=HEADS, pretrained_window_size=-1)


@pytest.mark.parametrize('name', BLOCKS)
def test_bad_input(name):
    m = BLOCKS[name](C, num_heads=HEADS)
    with pytest.raises(ValueError, match=BLOCKS[name].__name__):
        m(torch.randn(2, C, 5))
    with pytest.raises(ValueError, match='channels'):
        m(torch.randn(2, C + 1, 5, 5))
