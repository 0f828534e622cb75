"""SASA, HaloNet and axial attention against float64 references written from their papers' equations (an explicit
loop over query positions building each neighbourhood's logits), output and gradients; odd sizes, batch 1, stride 2,
bf16, meta, eval/train and bad input."""

import math
import sys
from pathlib import Path

import pytest
import torch

import visattn
from visattn.layers import AxialAttn, HaloAttn, SasaStem, SelfAttn2d

sys.path.insert(0, str(Path(__file__).parent))
from _random_params import randomize  # noqa: E402

LOCAL = ['sasa', 'halo', 'axial']


def _randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Random parameters and BN statistics, so that no zero or unit init hides a wrong term."""
    return randomize(module, 0.4, lambda name, p: 'bn' in name and name.endswith('weight'))


def _params(m):
    return dict(m.named_parameters())


def _proj(x, w):
    """1×1 projection of x [C, H, W] (or [C, L]) by a conv weight [O, C, 1(, 1)]."""
    return torch.einsum('oc,c...->o...', w.flatten(1), x)


def _softmax_dot(logits, values):
    """Σ_p softmax_p(logits) values_p for a list of scalar logits and a list of vectors."""
    w = torch.softmax(torch.stack(logits), 0)
    return (w[:, None] * torch.stack(values)).sum(0)


def _avg_pool_ceil(y, s):
    """s×s average pooling with ceil division; a window cut by the border averages its inside pixels."""
    if s == 1:
        return y
    C, H, W = y.shape
    out = torch.zeros(C, -(-H // s), -(-W // s), dtype=y.dtype)
    rows = []
    for i in range(out.shape[1]):
        cols = [y[:, s * i:s * i + s, s * j:s * j + s].mean((1, 2)) for j in range(out.shape[2])]
        rows.append(torch.stack(cols, -1))
    return torch.stack(rows, 1)


# ----- references: one image x [C, H, W] at a time, float64 -----

def ref_sasa(x, m):
    """Eq. 3 of SASA: softmax over the k×k neighbourhood inside the image of q·k_ab + q·r_{a-i,b-j}."""
    P = _params(m)
    C, N, k = m.out_channels, m.num_heads, m.kernel_size
    D, r = C // N, k // 2
    q, key, v = _proj(x, P['qkv.weight']).split(C, 0)
    H, W = x.shape[1:]
    y = torch.zeros(C, H, W, dtype=x.dtype)
    for i in range(H):
        for j in range(W):
            heads = []
            for n in range(N):
                sl = slice(n * D, (n + 1) * D)
                logits, vals = [], []
                for a in range(max(0, i - r), min(H, i + r + 1)):
                    for b in range(max(0, j - r), min(W, j + r + 1)):
                        rel = torch.cat([P['rel_row'][a - i + r], P['rel_col'][b - j + r]])[sl]
                        logits.append(m.scale * (q[sl, i, j] @ key[sl, a, b] + q[sl, i, j] @ rel))
                        vals.append(v[sl, a, b])
                heads.append(_softmax_dot(logits, vals))
            y[:, i, j] = torch.cat(heads)
    return _avg_pool_ceil(y, m.stride)


def ref_halo(x, m):
    """HaloNet: the query at pixel (s·i, s·j) attends to its b×b block grown by h; logits
    (q·k + q·(r^h_{a-i} + r^w_{b-j})) / sqrt(d), offsets in input pixels. Pixels of the window outside the image are
    zero keys and values (pad_mode='zeros') or left out (pad_mode='mask')."""
    P = _params(m)
    N, s, bs, h = m.num_heads, m.stride, m.block_size, m.halo_size
    Dq, Dv, win = m.dim_head_qk, m.dim_head_v, m.win_size
    H, W = x.shape[1:]
    q = _proj(x, P['q.weight'])
    kv = _proj(x, P['kv.weight']).view(N, Dq + Dv, H, W)
    Ho, Wo = -(-H // s), -(-W // s)
    y = torch.zeros(N * Dv, Ho, Wo, dtype=x.dtype)
    for i in range(Ho):
        for j in range(Wo):
            pi, pj = s * i, s * j
            r0, c0 = pi // bs * bs, pj // bs * bs
            heads = []
            for n in range(N):
                qv = q[n * Dq:(n + 1) * Dq, pi, pj]
                logits, vals = [], []
                for a in range(r0 - h, r0 + bs + h):
                    for b in range(c0 - h, c0 + bs + h):
                        inside = 0 <= a < H and 0 <= b < W
                        if not inside and m.pad_mode == 'mask':
                            continue
                        key, val = (kv[n, :Dq, a, b], kv[n, Dq:, a, b]) if inside else (0 * qv, x.new_zeros(Dv))
                        rel = P['rel_height'][a - pi + win - 1] + P['rel_width'][b - pj + win - 1]
                        logits.append((qv @ key + qv @ rel) / math.sqrt(Dq))
                        vals.append(val)
                heads.append(_softmax_dot(logits, vals))
            y[:, i, j] = torch.cat(heads)
    return y


def _bn_eval(z, m, name, channel):
    bn = getattr(m, name)
    return (z - bn.running_mean[channel]) / torch.sqrt(bn.running_var[channel] + bn.eps) * bn.weight[channel] \
        + bn.bias[channel]


def ref_axial_layer(x, m):
    """Axial-DeepLab eq. 4 along one axis, with the paper's batch norms (eval mode): BN on the projection, on each
    similarity term per head, and on each output term."""
    P = _params(m)
    N, D, Co = m.num_heads, m.head_dim, m.out_channels
    if m.axis == 'width':
        x = x.transpose(1, 2)
    C, L, M = x.shape  # attend along L, independently for each of the M lines
    z = _proj(x, P['qkv.weight'])  # [2·Co, L, M]
    z = torch.stack([_bn_eval(z[c], m, 'bn_qkv', c) for c in range(2 * Co)])
    y = torch.zeros(Co, L, M, dtype=x.dtype)
    rel = P['relative']
    for line in range(M):
        for n in range(N):
            g = z[n * 2 * D:(n + 1) * 2 * D, :, line]
            q, k, v = g[:D // 2], g[D // 2:D], g[D:]
            for o in range(L):
                logits, vals, embs = [], [], []
                for p in range(L):
                    off = p - o
                    if m.span is not None and abs(off) > m.span // 2:
                        continue
                    e = rel[:, max(-m.reach, min(m.reach, off)) + m.reach]
                    terms = [q[:, o] @ k[:, p], q[:, o] @ e[:D // 2], k[:, p] @ e[D // 2:D]]
                    logits.append(sum(_bn_eval(t, m, 'bn_similarity', i * N + n) for i, t in enumerate(terms)))
                    vals.append(v[:, p])
                    embs.append(e[D:])
                sv, sve = _softmax_dot(logits, vals), _softmax_dot(logits, embs)
                for c in range(D):
                    ch = (n * D + c) * 2  # output BN channels: (head, channel, term)
                    y[n * D + c, o, line] = _bn_eval(sv[c], m, 'bn_output', ch) + _bn_eval(sve[c], m, 'bn_output',
                                                                                            ch + 1)
    return y.transpose(1, 2) if m.axis == 'width' else y


def ref_axial(x, m):
    return _avg_pool_ceil(ref_axial_layer(ref_axial_layer(x, m.height), m.width), m.stride)


def ref_batch(ref, x, m):
    return torch.stack([ref(xi, m) for xi in x])


CASES = {
    'sasa': (lambda **kw: SelfAttn2d(8, 16, kernel_size=3, num_heads=2, **kw), ref_sasa),
    'sasa_k5': (lambda **kw: SelfAttn2d(6, 8, kernel_size=5, num_heads=2, scale=0.5, **kw), ref_sasa),
    'halo': (lambda **kw: HaloAttn(8, 12, num_heads=2, block_size=4, halo_size=1, **kw), ref_halo),
    'halo_h0': (lambda **kw: HaloAttn(6, 8, num_heads=2, dim_head=3, block_size=2, halo_size=0, **kw), ref_halo),
    'halo_mask': (lambda **kw: HaloAttn(8, 12, num_heads=2, block_size=4, halo_size=2, pad_mode='mask', **kw),
                  ref_halo),
    'axial': (lambda **kw: AxialAttn(6, 8, num_heads=2, feat_size=4, **kw), ref_axial),
    'axial_span': (lambda **kw: AxialAttn(6, 8, num_heads=2, span=3, **kw), ref_axial),
}


@pytest.mark.parametrize('case, stride, batch', [
    ('sasa', 1, 2), ('sasa_k5', 2, 1), ('halo', 1, 1), ('halo', 2, 1), ('halo_h0', 2, 2), ('halo_mask', 1, 1),
    ('halo_mask', 2, 1), ('axial', 2, 1), ('axial_span', 1, 1),
])
def test_matches_reference_output_and_gradients(case, stride, batch):
    make, ref = CASES[case]
    m = _randomize(make(stride=stride, dtype=torch.float64)).eval()
    x = torch.randn(batch, m.channels, 7, 9, dtype=torch.float64, requires_grad=True)
    y = m(x)
    y_ref = ref_batch(ref, x, m)
    assert y.shape == y_ref.shape == (batch, m.out_channels, 4 if stride == 2 else 7, 5 if stride == 2 else 9)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    with torch.no_grad():  # the inference path (sasa: the shifted-window loop instead of the unfold)
        torch.testing.assert_close(m(x), y_ref, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(y)
    params = [p for p in m.parameters()]
    grads = torch.autograd.grad(y, [x, *params], g, allow_unused=True)
    grads_ref = torch.autograd.grad(y_ref, [x, *params], g, allow_unused=True)
    for (name, _), a, b in zip([('x', x), *m.named_parameters()], grads, grads_ref):
        if b is None:
            assert a is None or not a.any(), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=lambda s, n=name: f'{n}: {s}')


def test_sasa_stem_reference():
    """The attention of the SASA stem: blocked attention with spatially-aware values (paper section 3.2)."""
    m = _randomize(SasaStem(3, 8, block_size=4, num_heads=2, num_values=3, dtype=torch.float64))
    x = torch.randn(1, 3, 7, 9, dtype=torch.float64)
    P = _params(m)
    emb = P['emb_row'][:, None] + P['emb_col'][None]  # [4, 4, C]
    p = torch.softmax(torch.einsum('abc,mc->abm', emb, P['value_mix']), -1)
    q, k = _proj(x[0], P['qk.weight']).split(8, 0)
    vm = _proj(x[0], P['v.weight']).view(3, 8, 7, 9)
    y = torch.zeros(8, 7, 9, dtype=torch.float64)
    for i in range(7):
        for j in range(9):
            for n in range(2):
                sl = slice(4 * n, 4 * n + 4)
                logits, vals = [], []
                for a in range(i // 4 * 4, min(7, i // 4 * 4 + 4)):
                    for b in range(j // 4 * 4, min(9, j // 4 * 4 + 4)):
                        logits.append(q[sl, i, j] @ k[sl, a, b])
                        vals.append(sum(p[a % 4, b % 4, t] * vm[t, sl, a, b] for t in range(3)))
                y[sl, i, j] = _softmax_dot(logits, vals)
    torch.testing.assert_close(m(x)[0], y, rtol=1e-9, atol=1e-9)


def test_axial_span_covering_axis_equals_global():
    g = _randomize(AxialAttn(8, 16, num_heads=2, feat_size=13, dtype=torch.float64)).eval()
    loc = AxialAttn(8, 16, num_heads=2, span=25, dtype=torch.float64).eval()
    loc.load_state_dict(g.state_dict())
    x = torch.randn(1, 8, 13, 5, dtype=torch.float64)
    torch.testing.assert_close(loc(x), g(x))


def test_halo_is_local_and_padding_free():
    """A query's output depends exactly on its block grown by the halo, cut at the image border."""
    m = HaloAttn(8, 8, num_heads=2, block_size=4, halo_size=1, dtype=torch.float64)
    x = torch.randn(1, 8, 13, 17, dtype=torch.float64, requires_grad=True)
    y = m(x)
    assert y.shape == (1, 8, 13, 17)
    for (i, j), rows, cols in [((1, 1), slice(0, 5), slice(0, 5)), ((5, 9), slice(3, 9), slice(7, 13)),
                               ((12, 16), slice(11, 13), slice(15, 17))]:  # last: block of padding, 13×17 -> 16×20
        (g,) = torch.autograd.grad(y[0, :, i, j].sum(), x, retain_graph=True)
        touched = g[0].abs().sum(0) > 0
        expected = torch.zeros_like(touched)
        expected[rows, cols] = True
        assert torch.equal(touched, expected), (i, j)


@pytest.mark.parametrize('name', LOCAL)
@pytest.mark.parametrize('hw', [(13, 17), (1, 1)])
def test_odd_sizes_batch1_and_train_mode(name, hw):
    m = visattn.create_attn(name, 32)
    x = torch.randn(1, 32, *hw, requires_grad=True)
    if name == 'axial' and hw == (1, 1):
        m.eval()  # batch norm needs more than one value per channel in training
    y = m(x)
    assert y.shape == (1, 32, *hw) and torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_axial_train_uses_batch_statistics():
    m = AxialAttn(16, 16, num_heads=2)
    x = torch.randn(2, 16, 7, 9)
    y_train = m.train()(x)
    y_eval = m.eval()(x)
    assert torch.isfinite(y_train).all() and not torch.allclose(y_train, y_eval)


@pytest.mark.parametrize('name', LOCAL)
def test_stride2_shapes(name):
    m = visattn.create_attn(name, 16, out_channels=32, stride=2)
    for hw, out in [((7, 9), (4, 5)), ((8, 8), (4, 4)), ((13, 17), (7, 9))]:
        assert m(torch.randn(2, 16, *hw)).shape == (2, 32, *out)


@pytest.mark.parametrize('name', LOCAL)
def test_meta_and_bf16(name):
    m = visattn.create_attn(name, 32, device='meta')
    assert all(p.device.type == 'meta' for p in m.parameters())
    assert m(torch.empty(2, 32, 7, 9, device='meta')).shape == (2, 32, 7, 9)
    m32 = visattn.create_attn(name, 32).eval()
    m16 = visattn.create_attn(name, 32, dtype=torch.bfloat16).eval()
    m16.load_state_dict(m32.state_dict())
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    x = torch.randn(2, 32, 7, 9)
    with torch.no_grad():
        y16, y32 = m16(x.bfloat16()), m32(x)
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
    assert (y16.float() - y32).abs().mean() < 0.05 * y32.abs().mean() + 1e-3


def test_registry_metadata():
    assert set(LOCAL) <= set(visattn.list_attn(family='local'))
    assert visattn.info('halo').arxiv == '2103.12731' and visattn.info('sasa').arxiv == '1906.05909'
    assert visattn.info('axial').arxiv == '2003.07853'


@pytest.mark.parametrize('make, error, words', [
    (lambda: SelfAttn2d(16, kernel_size=4), ValueError, 'kernel_size'),
    (lambda: SelfAttn2d(16, 24, num_heads=8), ValueError, 'num_heads'),
    (lambda: SelfAttn2d(16.0), TypeError, 'channels'),
    (lambda: HaloAttn(16, block_size=6, stride=4), ValueError, 'stride'),
    (lambda: HaloAttn(16, 20, num_heads=8), ValueError, 'num_heads'),
    (lambda: HaloAttn(16, halo_size=-1), ValueError, 'halo_size'),
    (lambda: HaloAttn(16, dim_head=0), ValueError, 'dim_head'),
    (lambda: AxialAttn(16, 24, num_heads=8), ValueError, 'num_heads'),
    (lambda: AxialAttn(16, span=4), ValueError, 'span'),
    (lambda: AxialAttn(16, stride=0), ValueError, 'stride'),
])
def test_bad_arguments(make, error, words):
    with pytest.raises(error, match=words):
        make()


@pytest.mark.parametrize('name', LOCAL)
def test_bad_input(name):
    m = visattn.create_attn(name, 16)
    with pytest.raises(ValueError, match='channels'):
        m(torch.randn(1, 8, 5, 5))
    with pytest.raises(ValueError, match='4 dims'):
        m(torch.randn(16, 5, 5))


def _timm_halo(**kwargs):
    """timm's HaloAttn in float64 with random weights (its init leaves no term out, but its tables are random too)."""
    from timm.layers.halo_attn import HaloAttn as TimmHaloAttn

    torch.manual_seed(0)
    m = TimmHaloAttn(**kwargs).to(torch.float64)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return m


# timm configurations: stride 1; strided query blocks (relative offsets in query-grid steps); a stride that does not
# divide the block (timm's avg-pool downsampling, as haloregnetz_b); biases and the scaled relative term
TIMM_CASES = [
    (dict(dim=16, num_heads=2, block_size=4, halo_size=1), (8, 12)),
    (dict(dim=16, dim_out=24, num_heads=2, block_size=4, halo_size=2, stride=2), (8, 8)),
    (dict(dim=12, num_heads=3, block_size=3, halo_size=1, stride=2, qk_ratio=0.5), (6, 12)),
    (dict(dim=16, num_heads=2, dim_head=6, block_size=4, halo_size=3, qkv_bias=True, scale_pos_embed=True), (8, 4)),
]


@pytest.mark.parametrize('kwargs,hw', TIMM_CASES)
def test_halo_timm_compat_equals_timm(kwargs, hw):
    """compat='timm' takes timm's state dict as it is and gives timm's output and input gradient, borders included."""
    theirs = _timm_halo(**kwargs)
    ours = HaloAttn(kwargs['dim'], kwargs.get('dim_out'), compat='timm', dtype=torch.float64,
                    **{k: v for k, v in kwargs.items() if k not in ('dim', 'dim_out')})
    ours.load_state_dict(theirs.state_dict())  # strict: the same names and shapes
    assert HaloAttn.from_timm(theirs).state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(2, kwargs['dim'], *hw, dtype=torch.float64, requires_grad=True)
    y, y_ref = ours(x), theirs(x)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0],
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('kwargs,hw', [(TIMM_CASES[0][0], (7, 10)), (TIMM_CASES[1][0], (5, 11))])
def test_halo_timm_compat_runs_at_any_size(kwargs, hw):
    """At sizes timm refuses, compat='timm' equals timm on the map zero-padded at the bottom/right to a multiple of
    the block, cropped (the zeros pad mode: padding past the map is zero keys and values, as timm's halo padding)."""
    theirs = _timm_halo(**kwargs)
    ours = HaloAttn.from_timm(theirs)
    b, s = kwargs['block_size'], kwargs.get('stride', 1)
    x = torch.randn(1, kwargs['dim'], *hw, dtype=torch.float64)
    padded = torch.nn.functional.pad(x, (0, -hw[1] % b, 0, -hw[0] % b))
    want = theirs(padded)[:, :, :-(-hw[0] // s), :-(-hw[1] // s)]
    torch.testing.assert_close(ours(x), want, rtol=1e-10, atol=1e-12)


def test_halo_timm_model_runs_on_the_op():
    """A timm ByobNet with halo layers, its HaloAttn modules swapped for HaloAttn.from_timm: the same logits."""
    from timm.layers.halo_attn import HaloAttn as TimmHaloAttn
    from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg

    cfg = ByoModelCfg(blocks=(ByoBlockCfg(type='bottle', d=1, c=16, s=1, gs=0, br=0.25),
                              ByoBlockCfg(type='self_attn', d=2, c=32, s=2, gs=0, br=0.5)),
                      stem_chs=8, stem_type='tiered', stem_pool='maxpool', num_features=0,
                      self_attn_layer='halo', self_attn_kwargs=dict(block_size=4, halo_size=1, num_heads=2))
    torch.manual_seed(0)
    model = randomize(ByobNet(cfg, num_classes=10), 0.2, lambda n, p: p.dim() == 1 and n.endswith('weight'))
    model = model.to(torch.float64).eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        names = [n for n, mod in model.named_modules() if isinstance(mod, TimmHaloAttn)]
        assert len(names) == 2
        for name in names:
            parent, _, leaf = name.rpartition('.')
            setattr(model.get_submodule(parent), leaf, HaloAttn.from_timm(model.get_submodule(name)))
        torch.testing.assert_close(model(x), want, rtol=1e-10, atol=1e-12)
        # 15×11 at the halo stage, which timm's HaloAttn refuses
        assert model(torch.randn(1, 3, 60, 44, dtype=torch.float64)).shape == (1, 10)


def test_halo_pad_modes_differ_only_at_the_border():
    """'zeros' (the paper's) and 'mask' agree on blocks whose window lies inside the map and differ on border ones."""
    zeros = _randomize(HaloAttn(8, 8, num_heads=2, block_size=4, halo_size=1, dtype=torch.float64)).eval()
    mask = HaloAttn(8, 8, num_heads=2, block_size=4, halo_size=1, pad_mode='mask', dtype=torch.float64).eval()
    mask.load_state_dict(zeros.state_dict())
    x = torch.randn(1, 8, 12, 12, dtype=torch.float64)
    a, b = zeros(x), mask(x)
    torch.testing.assert_close(a[..., 4:8, 4:8], b[..., 4:8, 4:8], rtol=1e-12, atol=1e-14)  # the interior block
    assert (a[..., :4, :] - b[..., :4, :]).abs().amax() > 1e-3
