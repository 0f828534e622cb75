"""Mixers against plain float64 references written from their papers' equations, and the approximations'
convergence to softmax attention as their budget grows."""

import math

import pytest
import timm
import torch

import visattn
from visattn.mixers import masked_softmax, softmax_attention

F64 = dict(dtype=torch.float64)
B, N, C, H = 2, 11, 24, 3
D = C // H


def _mixer(name, **kw):
    return visattn.create_mixer(name, C, num_heads=H, qkv_bias=True, **F64, **kw).eval()


def _split(t):  # [B, N, H·D] -> [B, H, N, D]
    return t.reshape(t.shape[0], t.shape[1], -1, D).transpose(1, 2)


def _qkv(m, x):
    q, k, v = (x @ m.qkv.weight.T + m.qkv.bias).split(C, dim=-1)
    return _split(q), _split(k), _split(v)


def _out(m, o):  # [B, H, N, D] -> proj([B, N, C])
    return o.transpose(1, 2).reshape(o.shape[0], o.shape[2], C) @ m.proj.weight.T + m.proj.bias


def _softmax_ref(q, k, v, keep=None):
    """softmax(q kᵀ/√D) v with ``keep`` [.., N, M] bool; rows without a key give 0."""
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if keep is None:
        return torch.softmax(s, -1) @ v
    w = torch.exp(s - s.amax(-1, keepdim=True)) * keep
    return w @ v / w.sum(-1, keepdim=True).clamp_min(1e-300)


@pytest.fixture
def x():
    return torch.randn(B, N, C, **F64)


@pytest.fixture
def pad():
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, 7:] = False
    return mask


def test_full_matches_softmax_with_masks(x, pad):
    m = _mixer('full')
    q, k, v = _qkv(m, x)
    torch.testing.assert_close(m(x), _out(m, _softmax_ref(q, k, v)))
    torch.testing.assert_close(m(x, attn_mask=pad), _out(m, _softmax_ref(q, k, v, pad[:, None, None, :])))
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    torch.testing.assert_close(m(x, is_causal=True), _out(m, _softmax_ref(q, k, v, causal)))
    bias = torch.randn(B, H, N, N, **F64)
    s = q @ k.transpose(-2, -1) / math.sqrt(D) + bias
    torch.testing.assert_close(m(x, attn_mask=bias), _out(m, torch.softmax(s, -1) @ v))


def test_fully_masked_rows_are_zero_with_finite_gradients():
    q, k, v = (torch.randn(2, 2, 5, 4, **F64, requires_grad=True) for _ in range(3))
    kpm = torch.tensor([[True] * 5, [False] * 5])
    out = softmax_attention(q, k, v, kpm)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    logits = torch.randn(1, 1, 3, 3, **F64)
    p = masked_softmax(logits, attn_mask=torch.tensor([[0., float('-inf'), 0.]] * 2 + [[float('-inf')] * 3]))
    torch.testing.assert_close(p[0, 0, 2], torch.zeros(3, **F64))
    torch.testing.assert_close(p[0, 0, :2, 1], torch.zeros(2, **F64))


@pytest.mark.parametrize('n', [11, 150])
def test_linear_matches_its_equation_causal_and_not(n, pad):
    m = _mixer('linear')
    x = torch.randn(1, n, C, **F64)
    q, k, v = _qkv(m, x)
    fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    a = fq @ fk.transpose(-2, -1)  # φ(q_i)·φ(k_j)
    for causal in (False, True):
        w = a.tril() if causal else a
        ref = _out(m, (w @ v) / w.sum(-1, keepdim=True))
        torch.testing.assert_close(m(x, is_causal=causal), ref, rtol=1e-5, atol=1e-6)
    if n == N:
        x2 = torch.randn(B, N, C, **F64)
        q, k, v = _qkv(m, x2)
        w = (torch.nn.functional.elu(q) + 1) @ (torch.nn.functional.elu(k) + 1).transpose(-2, -1) * pad[:, None, None]
        torch.testing.assert_close(m(x2, attn_mask=pad), _out(m, (w @ v) / w.sum(-1, keepdim=True)), rtol=1e-5,
                                   atol=1e-6)


def test_efficient_matches_its_equation(x, pad):
    m = _mixer('efficient')
    q, k, v = _qkv(m, x)
    torch.testing.assert_close(m(x), _out(m, torch.softmax(q, -1) @ (torch.softmax(k, -2).transpose(-2, -1) @ v)),
                               rtol=1e-5, atol=1e-6)
    rk = torch.exp(k) * pad[:, None, :, None]
    rk = rk / rk.sum(-2, keepdim=True)
    ref = _out(m, torch.softmax(q, -1) @ (rk.transpose(-2, -1) @ v))
    torch.testing.assert_close(m(x, attn_mask=pad), ref, rtol=1e-5, atol=1e-6)
    s = _mixer('efficient', normalization='scaling')
    s.load_state_dict(m.state_dict())
    torch.testing.assert_close(s(x), _out(m, (q / math.sqrt(N)) @ ((k / math.sqrt(N)).transpose(-2, -1) @ v)))


def test_fast_matches_its_equation(x, pad):
    m = _mixer('fast')
    q, k, v = _qkv(m, x)
    qn, kn = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(m(x), _out(m, qn @ kn.transpose(-2, -1) @ v / N))
    n_real = pad.sum(-1)[:, None, None, None]
    ref = _out(m, qn @ (kn * pad[:, None, :, None]).transpose(-2, -1) @ v / n_real)
    torch.testing.assert_close(m(x, attn_mask=pad), ref)


def _synth_ref(m, x, logits, causal=False):
    v = x @ m.v.weight.T + m.v.bias if m.v is not None else _qkv(m, x)[2].transpose(1, 2).reshape(x.shape)
    keep = torch.ones(N, N, dtype=torch.bool).tril() if causal else torch.ones(N, N, dtype=torch.bool)
    p = torch.exp(logits - logits.amax(-1, keepdim=True)) * keep
    return _out(m, (p / p.sum(-1, keepdim=True)) @ _split(v))


def test_synthesizer_dense_and_random(x):
    m = _mixer('synthesizer_dense', seq_len=16)
    d = m.synth['dense']
    hidden = torch.relu(x @ d.fc1.weight.T + d.fc1.bias)
    logits = (hidden @ d.fc2.weight.T + d.fc2.bias).reshape(B, N, H, 16)[..., :N].transpose(1, 2)
    torch.testing.assert_close(m(x), _synth_ref(m, x, logits))
    torch.testing.assert_close(m(x, is_causal=True), _synth_ref(m, x, logits, causal=True))
    r = _mixer('synthesizer_random', seq_len=16)
    torch.testing.assert_close(r(x), _synth_ref(r, x, r.synth['random'].weight[None, :, :N, :N]))
    fixed = _mixer('synthesizer_random', seq_len=16, trainable=False)
    assert not list(fixed.synth.parameters()) and fixed.synth['random'].weight.shape == (H, 16, 16)


def test_synthesizer_factorized(x):
    m = _mixer('synthesizer_factorized_dense', seq_len=12, factor=3)  # a = 3, b = 4
    f = m.synth['factorized_dense']
    hidden = torch.relu(x @ f.fc1.weight.T + f.fc1.bias)
    a = (hidden @ f.fc_a.weight.T + f.fc_a.bias).reshape(B, N, H, 3)
    b = (hidden @ f.fc_b.weight.T + f.fc_b.bias).reshape(B, N, H, 4)
    logits = torch.empty(B, N, H, 12, **F64)
    for i in range(3):
        for j in range(4):
            logits[..., j * 3 + i] = a[..., i] * b[..., j]  # H_A tiles A, H_B repeats each entry of B
    torch.testing.assert_close(m(x), _synth_ref(m, x, logits.transpose(1, 2)[..., :N]))
    r = _mixer('synthesizer_factorized_random', seq_len=12, rank=2)
    f = r.synth['factorized_random']
    assert f.r1.shape == (H, 12, 2)
    torch.testing.assert_close(r(x), _synth_ref(r, x, (f.r1 @ f.r2.transpose(-2, -1))[None, :, :N, :N]))


def test_synthesizer_mixture_random_plus_vanilla(x):
    m = _mixer('synthesizer_mixture', seq_len=N)
    with torch.no_grad():
        m.mix_logits.copy_(torch.tensor([0.3, -0.2]))
    alpha = torch.softmax(m.mix_logits, 0)
    q, k, _ = _qkv(m, x)
    logits = alpha[0] * m.synth['random'].weight[None] + alpha[1] * q @ k.transpose(-2, -1) / math.sqrt(D)
    torch.testing.assert_close(m(x), _synth_ref(m, x, logits))


@pytest.mark.parametrize('name, groups', [('mqa', 1), ('gqa', 3), ('gqa', 1)])
def test_grouped_query_matches_per_head_reference(x, name, groups):
    m = _mixer(name) if name == 'mqa' else _mixer(name, num_kv_heads=groups)
    proj = x @ m.qkv.weight.T + m.qkv.bias
    assert proj.shape[-1] == (H + 2 * groups) * D
    q = _split(proj[..., :H * D])
    k = _split(proj[..., H * D:(H + groups) * D])
    v = _split(proj[..., (H + groups) * D:])
    heads = [_softmax_ref(q[:, h], k[:, h * groups // H], v[:, h * groups // H]) for h in range(H)]
    torch.testing.assert_close(m(x), _out(m, torch.stack(heads, 1)))


def test_xca_matches_cross_covariance_equation(x, pad):
    m = _mixer('xca')
    with torch.no_grad():
        m.temperature.copy_(torch.tensor([0.5, 1., 2.]).reshape(H, 1, 1))
    for mask in (None, pad):
        q, k, v = _qkv(m, x)
        if mask is not None:
            q, k, v = (t * mask[:, None, :, None] for t in (q, k, v))
        out = torch.empty_like(q)
        for b in range(B):
            for h in range(H):
                qn = q[b, h] / q[b, h].norm(dim=0, keepdim=True)  # l2 over the tokens
                kn = k[b, h] / k[b, h].norm(dim=0, keepdim=True)
                a = torch.softmax(qn.T @ kn * m.temperature[h, 0, 0], dim=-1)  # [D, D]
                out[b, h] = v[b, h] @ a.T
        got = m(x, attn_mask=mask)
        ref = _out(m, out)
        if mask is None:
            torch.testing.assert_close(got, ref)
        else:
            torch.testing.assert_close(got[mask], ref[mask])


@pytest.mark.parametrize('name', ['aft_simple', 'aft_full', 'aft_local'])
@pytest.mark.parametrize('causal', [False, True])
def test_aft_matches_its_equation(x, pad, name, causal):
    kw = {} if name == 'aft_simple' else dict(seq_len=16)
    if name == 'aft_local':
        kw['local_window'] = 3
    m = _mixer(name, **kw)
    w = torch.zeros(N, N, **F64)
    if name != 'aft_simple':
        with torch.no_grad():
            m.pos_bias.normal_()
        w = m.pos_bias[:N, :N].detach().clone()
    if name == 'aft_local':
        t = torch.arange(N)
        w = w * ((t[:, None] - t[None, :]).abs() < 3)
    q, k, v = _qkv(m, x)
    y = torch.zeros_like(q)
    for t in range(N):
        for s in range(t + 1 if causal else N):
            e = torch.exp(k[..., s, :] + w[t, s]) * pad[:, None, s, None]
            y[..., t, :] += e * v[..., s, :]
            w_sum = e if s == 0 else w_sum + e  # noqa: F821 (bound at s == 0)
        y[..., t, :] = torch.sigmoid(q[..., t, :]) * y[..., t, :] / w_sum
    got = m(x, attn_mask=pad, is_causal=causal)
    torch.testing.assert_close(got[pad], _out(m, y)[pad])


def test_fnet_is_the_real_part_of_the_2d_dft(x):
    def dft(n):
        j = torch.arange(n, dtype=torch.float64)
        return torch.exp(-2j * math.pi * j[:, None] * j[None, :] / n)

    ref = (dft(N) @ x.to(torch.complex128) @ dft(C)).real  # DFT over tokens (left) and channels (right)
    m = _mixer('fnet')
    torch.testing.assert_close(m(x), ref)
    assert not list(m.parameters())


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_performer_approaches_softmax_as_features_grow():
    torch.manual_seed(0)
    q, k, v = (0.5 * torch.randn(1, 2, 32, 16, **F64) for _ in range(3))
    keep = torch.ones(32, 32, dtype=torch.bool).tril()
    errs = {}
    for m in (8, 128, 2048):
        e = []
        for seed in range(3):
            torch.manual_seed(seed)
            p = visattn.create_mixer('performer', 32, num_heads=2, nb_features=m, **F64)
            e.append(_rel_err(p.attend(q, k, v, None, None, False), _softmax_ref(q, k, v)))
            e.append(_rel_err(p.attend(q, k, v, None, None, True), _softmax_ref(q, k, v, keep)))
        errs[m] = sum(e) / len(e)
    assert errs[2048] < errs[128] < errs[8], errs
    assert errs[2048] < 0.1, errs


def test_performer_redraws_its_features_in_training():
    p = visattn.create_mixer('performer', 16, num_heads=2, feature_redraw_interval=2)
    w0 = p.projection.clone()
    x = torch.randn(1, 5, 16)
    p.eval()
    p(x), p(x), p(x)
    assert torch.equal(p.projection, w0)
    p.train()
    p(x), p(x)
    assert torch.equal(p.projection, w0)
    p(x)
    assert not torch.equal(p.projection, w0)
    w = p.projection[:8]  # one orthogonal block of D = 8 rows
    gram = w @ w.T
    torch.testing.assert_close(gram - torch.diag(torch.diag(gram)), torch.zeros(8, 8), atol=1e-4, rtol=0)


def test_nystrom_approaches_softmax_as_landmarks_grow():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 32, 8, **F64) for _ in range(3))
    errs = {}
    for m in (2, 8, 16, 32):  # the paper's 6 pseudo-inverse iterations
        ny = visattn.create_mixer('nystrom', 16, num_heads=2, num_landmarks=m, conv_kernel_size=None, **F64)
        errs[m] = _rel_err(ny.attend(q, k, v, None, None, False), _softmax_ref(q, k, v))
    assert errs[32] < errs[16] < errs[8] < errs[2], errs
    assert errs[32] < 0.1, errs
    exact = visattn.create_mixer('nystrom', 16, num_heads=2, num_landmarks=32, conv_kernel_size=None,
                                 pinv_iterations=30, **F64)  # one landmark per token, converged inverse
    assert _rel_err(exact.attend(q, k, v, None, None, False), _softmax_ref(q, k, v)) < 1e-4


def test_nystrom_convolution_is_a_depthwise_skip_on_v():
    ny = visattn.create_mixer('nystrom', 16, num_heads=2, num_landmarks=4, **F64)
    q, k, v = (torch.randn(1, 2, 10, 8, **F64) for _ in range(3))
    no_conv = visattn.create_mixer('nystrom', 16, num_heads=2, num_landmarks=4, conv_kernel_size=None, **F64)
    kernel = ny.conv.weight[:, 0, :, 0]  # [H, 33]
    ref = torch.zeros_like(v)
    for h in range(2):
        for t in range(10):
            for j in range(10):
                ref[0, h, t] += kernel[h, 16 + j - t] * v[0, h, j]
    diff = ny.attend(q, k, v, None, None, False) - no_conv.attend(q, k, v, None, None, False)
    torch.testing.assert_close(diff, ref)


@pytest.mark.parametrize('sharing', ['headwise', 'kv', 'none'])
def test_linformer_with_identity_projections_is_softmax_attention(x, sharing):
    lin = _mixer('linformer', seq_len=N, k=N, sharing=sharing)
    with torch.no_grad():
        for p in (lin.proj_e, lin.proj_f):
            if p is not None:
                p.copy_(torch.eye(N, **F64).expand_as(p))
    full = _mixer('full')
    full.load_state_dict({k: v for k, v in lin.state_dict().items() if k in full.state_dict()})
    torch.testing.assert_close(lin(x), full(x))
    assert (lin.proj_f is None) == (sharing == 'kv')
    assert lin.proj_e.shape[0] == (H if sharing == 'none' else 1)


def test_linformer_projects_to_k():
    lin = _mixer('linformer', seq_len=N, k=4)
    x = torch.randn(1, N, C, **F64)
    q, k, v = _qkv(lin, x)
    e, f = lin.proj_e, lin.proj_f
    torch.testing.assert_close(lin(x), _out(lin, _softmax_ref(q, e @ k, f @ v)))


@pytest.mark.parametrize('name, theirs', [
    ('full', lambda: timm.layers.Attention(C, H, qkv_bias=True, qk_norm=True, norm_layer=torch.nn.LayerNorm)),
    ('xca', lambda: timm.models.xcit.XCA(C, H, qkv_bias=True)),
])
def test_same_state_dict_and_output_as_timm(x, name, theirs):
    ref = theirs().to(torch.float64).eval()
    kw = dict(qk_norm=True, norm_layer=torch.nn.LayerNorm) if name == 'full' else {}
    ours = _mixer(name, **kw)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), ref(x))
