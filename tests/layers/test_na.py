"""Neighbourhood attention (NAT / DiNAT) against a float64 reference written from NATTEN's definition: an explicit loop
over the queries, each window placed by NATTEN's own border rule (``get_window_start`` / ``get_pb_start`` of its
CPU kernels, written out below), the relative position bias indexed as NATTEN indexes it; output and every gradient
at odd sizes, maps smaller than the window (both padding modes), dilation; the receptive field; equality with
``natten`` where it is installed; options, errors, bf16, TorchScript."""

import sys
from pathlib import Path

import pytest
import torch

import visattn
from visattn.layers import NeighborhoodAttn, NeighborhoodAttnNHWC

sys.path.insert(0, str(Path(__file__).parent))
from _random_params import randomize  # noqa: E402


def natten_start(i: int, length: int, k: int, d: int) -> int:
    """First key position of query ``i``'s window along one axis (NATTEN's ``get_window_start``)."""
    ns = k // 2
    if d <= 1:
        return max(i - ns, 0) + (i + ns >= length) * (length - i - ns - 1)
    if i - ns * d < 0:
        return i % d
    if i + ns * d >= length:
        a = length // d * d
        b = length - a
        return length - b + i % d - 2 * ns * d if i % d < b else a + i % d - k * d
    return i - ns * d


def natten_pb_start(i: int, length: int, k: int, d: int) -> int:
    """Bias row of the first key of query ``i``'s window along one axis (NATTEN's ``get_pb_start``)."""
    ns = k // 2
    if d <= 1:
        return ns + (i < ns) * (ns - i) + (i + ns >= length) * (length - i - 1 - ns)
    if i - ns * d < 0:
        return k - 1 - i // d
    if i + ns * d >= length:
        return (length - i - 1) // d
    return ns


def natten_windows(H: int, W: int, Hp: int, Wp: int, k: int, d: int, skip_padded: bool) -> list[tuple]:
    """An explicit loop over the queries of the H×W map and the k×k window of each on the padded Hp×Wp map:
    ``(query, key, bias row, bias column)`` for every pair, flat indices, NATTEN's window and bias rules."""
    pairs = []
    for i in range(H):
        for j in range(W):
            sy, sx = natten_start(i, Hp, k, d), natten_start(j, Wp, k, d)
            py, px = natten_pb_start(i, Hp, k, d), natten_pb_start(j, Wp, k, d)
            for a in range(k):
                for b in range(k):
                    ky, kx = sy + a * d, sx + b * d
                    if skip_padded and (ky >= H or kx >= W):
                        continue
                    pairs.append((i * W + j, ky * Wp + kx, py + a, px + b))
    return pairs


def ref_na(x: torch.Tensor, m: NeighborhoodAttn) -> torch.Tensor:
    """The layer on one image x [C, H, W], from its parameters: zero-pad to k·d per side (NAT's released code), per
    pixel ``qkv = W x + b``, per query and head a softmax over its k×k window (`natten_windows`; padded keys left
    out with ``pad_mode='mask'``) of ``s·q·k + rpb``, then ``proj``. The logits of all pairs are computed densely
    and every pair outside the windows is excluded."""
    P = dict(m.named_parameters())
    C, H, W = x.shape
    N, k, d = m.num_heads, m.kernel_size, m.dilation
    D = C // N
    Hp, Wp = max(H, k * d), max(W, k * d)
    xp = x.new_zeros(C, Hp, Wp)
    xp[:, :H, :W] = x
    qkv = torch.einsum('oc,chw->ohw', P['qkv.weight'], xp)
    if 'qkv.bias' in P:
        qkv = qkv + P['qkv.bias'][:, None, None]
    q, key, v = (t.reshape(N, D, Hp * Wp) for t in qkv.split(C))  # channel n·D + c of each is head n
    qi, ki, by, bx = torch.tensor(natten_windows(H, W, Hp, Wp, k, d, m.pad_mode == 'mask')).unbind(1)
    assert len(set(zip(qi.tolist(), ki.tolist()))) == len(qi)  # no key twice in a window
    logits = torch.full((N, H * W, Hp * Wp), float('-inf'), dtype=x.dtype)
    rows = (torch.arange(H)[:, None] * Wp + torch.arange(W)).flatten()  # the queries' flat positions
    pair = m.scale * (q[:, :, rows[qi]] * key[:, :, ki]).sum(1)  # [N, pairs]
    if m.rpb is not None:
        pair = pair + P['rpb'][:, by, bx]
    logits = logits.index_put((torch.arange(N)[:, None], qi[None], ki[None]), pair)
    y = torch.einsum('nqk,ndk->ndq', torch.softmax(logits, -1), v).reshape(C, H, W)
    return torch.einsum('oc,chw->ohw', P['proj.weight'], y) + P['proj.bias'][:, None, None]


def _block(C=8, **kw) -> NeighborhoodAttn:
    torch.manual_seed(0)
    m = NeighborhoodAttn(C, dtype=torch.float64, **{'num_heads': 2, **kw})
    return randomize(m, 0.4, lambda n, p: False).eval()


CASES = [  # (H, W, kernel_size, dilation, pad_mode, rel_pos_bias)
    (7, 9, 3, 1, 'zeros', True),
    pytest.param(13, 17, 5, 2, 'zeros', True, marks=pytest.mark.slow),
    (13, 17, 3, 3, 'zeros', False),
    (1, 1, 3, 1, 'zeros', True),
    (5, 7, 7, 1, 'zeros', True),  # smaller than the window: padded to 7×7
    (5, 7, 3, 2, 'mask', True),  # smaller than k·d = 6 along H: padded keys masked
    (1, 1, 3, 2, 'mask', True),
    (9, 4, 3, 2, 'mask', True),
]


@pytest.mark.parametrize('H,W,ks,dil,pad_mode,rpb', CASES)
def test_matches_reference_output_and_gradients(H, W, ks, dil, pad_mode, rpb):
    m = _block(kernel_size=ks, dilation=dil, pad_mode=pad_mode, rel_pos_bias=rpb)
    x = torch.randn(2, 8, H, W, dtype=torch.float64, requires_grad=True)
    y = m(x)
    want = torch.stack([ref_na(xi, m) for xi in x])
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    params = list(m.parameters())
    got = torch.autograd.grad(y, [x, *params], g)
    ref = torch.autograd.grad(want, [x, *params], g)
    names = ['x'] + [n for n, _ in m.named_parameters()]
    assert ('rpb' in names) == rpb
    for n, a, b in zip(names, got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=n)


def test_training_mode_without_dropout_is_eval():
    m = _block(kernel_size=3, dilation=2)
    x = torch.randn(1, 8, 9, 11, dtype=torch.float64)
    torch.testing.assert_close(m.train()(x), m.eval()(x), rtol=0, atol=0)


def _window(i: int, length: int, k: int, d: int) -> set[int]:
    s = natten_start(i, length, k, d)
    return {s + t * d for t in range(k)}


@pytest.mark.parametrize('H,W,ks,dil,pad_mode,pos', [
    (11, 13, 3, 2, 'zeros', (0, 12)),
    (11, 13, 3, 2, 'zeros', (5, 6)),
    (12, 10, 3, 3, 'zeros', (11, 1)),
    (5, 6, 3, 2, 'zeros', (4, 2)),  # padded to 6×6
    (5, 6, 3, 2, 'mask', (1, 5)),
])
def test_receptive_field_is_the_natten_window(H, W, ks, dil, pad_mode, pos):
    """Perturbing input pixel ``pos`` moves exactly the outputs whose k×k window (NATTEN's borders on the padded
    map, every dilation-th position) holds ``pos``."""
    m = _block(kernel_size=ks, dilation=dil, pad_mode=pad_mode)
    x = torch.randn(1, 8, H, W, dtype=torch.float64)
    x2 = x.clone()
    x2[0, :, pos[0], pos[1]] += 1.0
    moved = (m(x2) - m(x)).abs().amax(1)[0] > 1e-12
    Hp, Wp = max(H, ks * dil), max(W, ks * dil)
    want = torch.tensor([[pos[0] in _window(i, Hp, ks, dil) and pos[1] in _window(j, Wp, ks, dil)
                          for j in range(W)] for i in range(H)])
    assert want.sum() < H * W  # a real test: some outputs must stay put
    assert torch.equal(moved, want), (moved.int(), want.int())


def test_padding_modes_differ_only_on_small_maps():
    zeros, mask = _block(kernel_size=3, dilation=2), _block(kernel_size=3, dilation=2, pad_mode='mask')
    mask.load_state_dict(zeros.state_dict())
    big = torch.randn(1, 8, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(mask(big), zeros(big), rtol=0, atol=1e-12)
    small = torch.randn(1, 8, 5, 7, dtype=torch.float64)
    assert not torch.allclose(mask(small), zeros(small), atol=1e-4)


def test_nhwc_entry_is_the_same_layer():
    m = _block(kernel_size=3, dilation=2)
    nhwc = NeighborhoodAttnNHWC(8, num_heads=2, kernel_size=3, dilation=2, dtype=torch.float64)
    nhwc.load_state_dict(m.state_dict())
    x = torch.randn(2, 8, 5, 9, dtype=torch.float64)
    want = m(x)
    torch.testing.assert_close(nhwc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), want, rtol=0, atol=0)
    torch.testing.assert_close(m.forward_nhwc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r'NeighborhoodAttnNHWC: x must be \[B, H, W, 8\]'):
        nhwc(x)


def test_parameters_are_natten_and_nat():
    m = NeighborhoodAttn(64, num_heads=2, kernel_size=7)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {'qkv.weight': (192, 64), 'qkv.bias': (192,), 'rpb': (2, 13, 13), 'proj.weight': (64, 64),
                      'proj.bias': (64,)}
    assert m.rpb.abs().max() <= 2 and 0.01 < m.rpb.std() < 0.03  # trunc-normal, std 0.02
    assert m.scale == 32 ** -0.5 and NeighborhoodAttn(64, num_heads=2, qk_scale=0.5).scale == 0.5
    bare = NeighborhoodAttn(64, num_heads=2, rel_pos_bias=False, qkv_bias=False)
    assert sorted(n for n, _ in bare.named_parameters()) == ['proj.bias', 'proj.weight', 'qkv.weight']
    assert visattn.info('na').backends == ('torch', 'triton') and visattn.info('na').family == 'local'


def test_attention_dropout():
    """``attn_drop`` acts on the attention weights in training only: with rate 1 every weight is dropped and the
    output is the projection's bias."""
    m = _block(kernel_size=3, attn_drop=1.0).train()
    x = torch.randn(1, 8, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(m(x), m.proj.bias[None, :, None, None].expand(1, 8, 6, 7), rtol=0, atol=1e-12)
    m.eval()
    ref = _block(kernel_size=3)
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x), ref(x), rtol=0, atol=0)
    half = _block(kernel_size=3, attn_drop=0.5).train()
    torch.manual_seed(1)
    a = half(x)
    assert not torch.allclose(a, half(x)) and torch.isfinite(a).all()


def test_torchscript_matches_eager():
    for pad_mode in ('zeros', 'mask'):
        m = _block(kernel_size=3, dilation=2, pad_mode=pad_mode)
        scripted = torch.jit.script(m)
        for hw in ((5, 7), (9, 8)):
            x = torch.randn(1, 8, *hw, dtype=torch.float64)
            torch.testing.assert_close(scripted(x), m(x), rtol=1e-12, atol=1e-12)


def test_bf16():
    m32 = _block(kernel_size=3, dilation=2).float()
    m16 = _block(kernel_size=3, dilation=2).to(torch.bfloat16)
    x = torch.randn(2, 8, 7, 9)
    y = m16(x.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), m32(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize('kwargs,match', [
    (dict(num_heads=3), 'divisible by num_heads'),
    (dict(kernel_size=4), 'kernel_size'),
    (dict(pad_mode='reflect'), 'pad_mode'),
    (dict(qk_scale=0.), 'qk_scale'),
    (dict(attn_drop=1.5), 'attn_drop'),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        NeighborhoodAttn(8, **{'num_heads': 2, **kwargs})


def test_bad_input():
    m = NeighborhoodAttn(8, num_heads=2)
    with pytest.raises(ValueError, match='NeighborhoodAttn: x has 6 channels'):
        m(torch.randn(1, 6, 5, 5))
    with pytest.raises(ValueError, match='4 dims'):
        m(torch.randn(8, 5, 5))


@pytest.mark.parametrize('hw,ks,dil', [
    ((12, 12), 3, 4),
    pytest.param((14, 15), 5, 2, marks=pytest.mark.slow),
    pytest.param((9, 11), 7, 1, marks=pytest.mark.slow),
])
def test_equals_natten(hw, ks, dil):
    """natten's ``NeighborhoodAttention2D`` with our weights (its CPU path, FlexAttention: float32, forward only, no
    relative bias in natten >= 0.20), on maps of at least k·dilation (natten >= 0.17 no longer pads)."""
    natten = pytest.importorskip('natten')
    torch.manual_seed(0)
    theirs = natten.NeighborhoodAttention2D(16, 2, ks, dilation=dil)
    ours = NeighborhoodAttnNHWC(16, num_heads=2, kernel_size=ks, dilation=dil, rel_pos_bias=False)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, *hw, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_triton_path_matches_reference(monkeypatch):
    """The op's Triton kernels (Triton's CPU interpreter, ``VISATTN_BACKEND=triton``; on CUDA they are the default
    path), float32, against the float64 reference: output and every gradient."""
    pytest.importorskip('triton')
    monkeypatch.setenv('VISATTN_BACKEND', 'triton')
    m64 = _block(kernel_size=3, dilation=2)
    m32 = _block(kernel_size=3, dilation=2).float()
    x = torch.randn(1, 8, 9, 11, dtype=torch.float64, requires_grad=True)
    x32 = x.detach().float().requires_grad_()
    y = m32(x32)
    want = ref_na(x[0], m64)[None]
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(want)
    got = torch.autograd.grad(y, [x32, *m32.parameters()], g.float())
    ref = torch.autograd.grad(want, [x, *m64.parameters()], g)
    for n, a, b in zip(['x'] + [n for n, _ in m32.named_parameters()], got, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=n)
