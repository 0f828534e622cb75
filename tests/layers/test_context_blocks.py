"""NL, CC, DA, EMA, external and efficient attention against float64 references written plainly from their papers'
equations (dense matrices, explicit normalisations), on output and on input and parameter gradients; odd sizes,
batch 1, train/eval, bf16, meta, the bases' moving average, cc's memory bound, bad input."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from _random_params import randomize  # noqa: E402

CONTEXT = ['nl', 'cc', 'da', 'da_position', 'da_channel', 'ema', 'external', 'efficient']
IDENTITY_AT_INIT = ['nl', 'cc', 'da', 'da_position', 'da_channel']


def _randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Random parameters (γ's included) and BN statistics, so that zero-initialised parts cannot hide a formula."""
    return randomize(module, 0.5, lambda name, p: name.endswith('norm.weight'))


# ----- plain building blocks of the references (float64; P: name -> parameter, S: name -> buffer) -----

def _conv1x1(x, P, prefix, bias=True):
    """A 1×1 conv on x: [B, C, N] -> [B, O, N]."""
    y = torch.einsum('oc,bcn->bon', P[prefix + '.weight'][:, :, 0, 0], x)
    return y + P[prefix + '.bias'][None, :, None] if bias else y


def _bn(x, P, S, prefix, training):
    """Batch norm of x: [B, C, N] over (B, N) in training, with running statistics in eval."""
    if training:
        mean, var = x.mean((0, 2), keepdim=True), x.var((0, 2), unbiased=False, keepdim=True)
    else:
        mean, var = S[prefix + '.running_mean'][None, :, None], S[prefix + '.running_var'][None, :, None]
    weight, bias = P[prefix + '.weight'][None, :, None], P[prefix + '.bias'][None, :, None]
    return (x - mean) / torch.sqrt(var + 1e-5) * weight + bias


def _normalize_rows(scores, mask=None):
    """exp(s) / Σ exp(s) along the last dim, over the entries where ``mask`` is True."""
    e = torch.exp(scores - scores.amax(-1, keepdim=True))
    if mask is not None:
        e = e * mask
    return e / e.sum(-1, keepdim=True)


def _maxpool2_ceil(x):
    """2×2 max pooling of [B, C, H, W], a partial window at odd ends (the paper's subsampling)."""
    b, c, h, w = x.shape
    kh, kw = min(2, h), min(2, w)
    x = F.pad(x, (0, -w % kw, 0, -h % kh), value=float('-inf'))
    return x.view(b, c, x.shape[2] // kh, kh, x.shape[3] // kw, kw).amax((3, 5))


# ----- references from the papers' equations (x: [B, C, H, W]) -----

def ref_nl(x, P, S, training, sub_sample=False):
    b, c, h, w = x.shape
    flat = x.flatten(2)
    theta = _conv1x1(flat, P, 'theta')
    phi, g = _conv1x1(flat, P, 'phi'), _conv1x1(flat, P, 'g')
    if sub_sample:
        phi = _maxpool2_ceil(phi.view(b, -1, h, w)).flatten(2)
        g = _maxpool2_ceil(g.view(b, -1, h, w)).flatten(2)
    f = _normalize_rows(theta.transpose(1, 2) @ phi)  # f(x_i, x_j) / C(x): [B, N, M]
    y = (f @ g.transpose(1, 2)).transpose(1, 2)  # [B, C/2, N]
    z = _bn(_conv1x1(y, P, 'out'), P, S, 'norm', training) + flat
    return z.view_as(x)


def _criss_cross_mask(h, w):
    """[N, N]: True where key j lies in the row or the column of query i (itself included once)."""
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    return (rows[:, None] == rows[None, :]) | (cols[:, None] == cols[None, :])


def ref_cc(x, P, S, training, recurrence=2):
    mask = _criss_cross_mask(*x.shape[2:])
    for _ in range(recurrence):  # the same weights in every pass
        flat = x.flatten(2)
        q, k, v = (_conv1x1(flat, P, name) for name in ('query', 'key', 'value'))
        scores = (q.transpose(1, 2) @ k).masked_fill(~mask, float('-inf'))  # [B, N, N], no scaling
        attn = _normalize_rows(scores, mask)
        x = x + P['gamma'] * (v @ attn.transpose(1, 2)).view_as(x)
    return x


def _pam_term(x, P, prefix=''):
    flat = x.flatten(2)
    q, k, v = (_conv1x1(flat, P, prefix + name) for name in ('query', 'key', 'value'))
    s = _normalize_rows(q.transpose(1, 2) @ k)  # s[j, i] = softmax_i(q_j · k_i)
    return P[prefix + 'gamma'] * (v @ s.transpose(1, 2)).view_as(x)


def _cam_term(x, P, prefix='', energy='paper'):
    a = x.flatten(2)
    gram = a @ a.transpose(1, 2)  # A_j · A_i: [B, C, C]
    scores = gram if energy == 'paper' else gram.amax(-1, keepdim=True) - gram
    return P[prefix + 'gamma'] * (_normalize_rows(scores) @ a).view_as(x)


def ref_da(x, P, S, training):
    return x + _pam_term(x, P, 'position.') + _cam_term(x, P, 'channel.')


def ref_da_position(x, P, S, training):
    return x + _pam_term(x, P)


def ref_da_channel(x, P, S, training, energy='paper'):
    return x + _cam_term(x, P, energy=energy)


def _unit(v, dim):
    return v / (1e-6 + torch.sqrt((v * v).sum(dim, keepdim=True)))


def ema_em(feats, bases, iters):
    """EM iterations: feats [B, C, N], bases [1, C, K] -> final bases [B, C, K], responsibilities [B, N, K]."""
    mu = bases.expand(feats.shape[0], -1, -1)
    for _ in range(iters):
        z = _normalize_rows(feats.transpose(1, 2) @ mu)  # E-step: softmax over the K bases
        weights = z / (1e-6 + z.sum(1, keepdim=True))  # M-step: weighted average over the N positions
        mu = _unit(feats @ weights, 1)
    return mu, z


def ref_ema(x, P, S, training, iters=3, em_grad=False):
    flat = x.flatten(2)
    feats = _conv1x1(flat, {**S, **P}, 'conv_in')  # buffers by default, parameters with em_grad=True
    with torch.set_grad_enabled(em_grad):
        mu, z = ema_em(feats, S['bases'], iters)
    recon = torch.relu(mu @ z.transpose(1, 2))
    y = _bn(_conv1x1(recon, P, 'conv_out', bias=False), P, S, 'norm', training)
    return torch.relu(flat + y).view_as(x)


def ref_external(x, P, S, training):
    flat = x.flatten(2)
    a = _conv1x1(_conv1x1(flat, P, 'conv_in'), P, 'mk', bias=False)  # [B, S, N]
    alpha = _normalize_rows(a)  # softmax over the N positions
    alpha = alpha / (1e-9 + alpha.sum(1, keepdim=True))  # l1 over the S slots
    y = _bn(_conv1x1(_conv1x1(alpha, P, 'mv', bias=False), P, 'conv_out', bias=False), P, S, 'norm', training)
    return torch.relu(flat + y).view_as(x)


def ref_efficient(x, P, S, training, heads=1):
    flat = x.flatten(2)
    keys, queries, values = (_conv1x1(flat, P, n).transpose(1, 2) for n in ('keys', 'queries', 'values'))  # [B, N, d]
    outs = []
    for qh, kh, vh in zip(queries.chunk(heads, -1), keys.chunk(heads, -1), values.chunk(heads, -1)):
        rho_q = _normalize_rows(qh)  # each query over its features
        rho_k = _normalize_rows(kh.transpose(1, 2)).transpose(1, 2)  # each key feature over the positions
        outs.append(rho_q @ (rho_k.transpose(1, 2) @ vh))  # ρ_q(Q) (ρ_k(K)ᵀ V): [B, N, d_v]
    e = torch.cat(outs, -1).transpose(1, 2)
    return (flat + _conv1x1(e, P, 'reprojection')).view_as(x)


REFS = {
    'nl': ref_nl, 'cc': ref_cc, 'da': ref_da, 'da_position': ref_da_position, 'da_channel': ref_da_channel,
    'ema': ref_ema, 'external': ref_external, 'efficient': ref_efficient,
}


def check_against_reference(module, ref, x, training, x_scale=1.0, **ref_kw):
    """Output, input gradient and every trainable parameter's gradient of ``module`` against ``ref`` (float64)."""
    module = _randomize(module.double()).train(training)
    module.zero_grad(set_to_none=True)
    P = {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in module.named_parameters()}
    S = {n: b.detach().clone() for n, b in module.named_buffers()}
    x = x.double() * x_scale
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = module(x1), ref(x2, P, S, training, **ref_kw)
    torch.testing.assert_close(y, y_ref, rtol=1e-7, atol=1e-9)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-7, atol=1e-9)
    assert x1.grad.abs().sum() > 0
    for n, p in module.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
            torch.testing.assert_close(p.grad, P[n].grad, rtol=1e-7, atol=1e-9, msg=lambda s, n=n: f'{n}: {s}')
    return module


@pytest.mark.parametrize('name', CONTEXT)
@pytest.mark.parametrize('shape', [(2, 16, 7, 9), (1, 16, 13, 17)])
def test_reference(name, shape):
    m = visattn.create_attn(name, shape[1])
    scale = 0.3 if name in ('da', 'da_channel') else 1.0  # keep A Aᵀ small enough that its softmax is not one-hot
    check_against_reference(m, REFS[name], torch.randn(shape), training=shape[0] > 1, x_scale=scale)


def test_nl_options_reference():
    m = visattn.create_attn('nl', 8, sub_sample=True)
    check_against_reference(m, lambda *a: ref_nl(*a, sub_sample=True), torch.randn(2, 8, 7, 9), training=False)
    check_against_reference(m, lambda *a: ref_nl(*a, sub_sample=True), torch.randn(1, 8, 1, 5), training=True)


def test_cc_one_pass():
    check_against_reference(
        visattn.create_attn('cc', 16, recurrence=1), lambda *a: ref_cc(*a, recurrence=1), torch.randn(2, 16, 5, 8),
        training=False)


def test_da_channel_code_energy_reference():
    m = visattn.create_attn('da_channel', 12, energy='code')
    check_against_reference(m, lambda *a: ref_da_channel(*a, energy='code'), torch.randn(2, 12, 7, 9), False, 0.3)


def test_ema_with_gradient_through_em():
    m = visattn.create_attn('ema', 16, num_bases=5, num_iters=2, em_grad=True)
    assert all(p.requires_grad for p in m.parameters())
    check_against_reference(m, lambda *a: ref_ema(*a, iters=2, em_grad=True), torch.randn(2, 16, 7, 9), False)


def test_ema_bases_move_by_moving_average_only_in_training():
    m = _randomize(visattn.create_attn('ema', 16, num_bases=6).double())
    # no gradient reaches it through the EM steps: its weights are buffers (same state-dict keys), not parameters
    assert not list(m.conv_in.parameters()) and {'conv_in.weight', 'conv_in.bias'} <= set(m.state_dict())
    assert torch.allclose(m.bases.norm(dim=1), torch.ones(1, 6, dtype=torch.float64), atol=1e-5)
    x = torch.randn(3, 16, 7, 9, dtype=torch.float64)
    before = m.bases.clone()
    m.eval()(x)
    assert torch.equal(m.bases, before)
    m.train()(x)
    mu, _ = ema_em(_conv1x1(x.flatten(2), m.state_dict(), 'conv_in'), before, 3)
    expected = 0.9 * before + 0.1 * _unit(mu.mean(0, keepdim=True), 1)
    torch.testing.assert_close(m.bases, expected.detach())


_EMA_DDP_SCRIPT = """
import sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import visattn

def run(rank, out):
    dist.init_process_group('gloo', init_method='file://' + out + '/store', rank=rank, world_size=2)
    torch.manual_seed(0)
    m = visattn.create_attn('ema', 16, num_bases=6).double().train()
    torch.manual_seed(1 + rank)
    m(torch.randn(3 + rank, 16, 7, 9, dtype=torch.float64))  # each rank its own batch (and batch size)
    torch.save(m.bases, f'{out}/bases{rank}.pt')
    dist.destroy_process_group()

if __name__ == '__main__':
    mp.start_processes(run, args=(sys.argv[1],), nprocs=2, start_method='fork')
"""


def test_ema_bases_average_over_processes(tmp_path):
    """Under torch.distributed the moving average takes the mean of the final bases over every rank's batch."""
    import subprocess
    import sys

    script = tmp_path / 'ema_ddp.py'
    script.write_text(_EMA_DDP_SCRIPT)
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, timeout=120)
    got = [torch.load(tmp_path / f'bases{r}.pt') for r in range(2)]
    assert torch.equal(got[0], got[1])
    torch.manual_seed(0)
    m = visattn.create_attn('ema', 16, num_bases=6).double()
    means = []
    for rank in range(2):
        torch.manual_seed(1 + rank)
        x = torch.randn(3 + rank, 16, 7, 9, dtype=torch.float64)
        mu, _ = ema_em(_conv1x1(x.flatten(2), m.state_dict(), 'conv_in'), m.bases, 3)
        means.append(mu.mean(0, keepdim=True))
    expected = 0.9 * m.bases + 0.1 * _unit((means[0] + means[1]) / 2, 1)
    torch.testing.assert_close(got[0], expected.detach())


def test_external_memories_start_tied():
    m = visattn.create_attn('external', 32, num_slots=8)
    assert m.mv.weight.shape == (32, 8, 1, 1)
    assert torch.equal(m.mv.weight[:, :, 0, 0], m.mk.weight[:, :, 0, 0].T)


def test_efficient_multi_head_reference():
    m = visattn.create_attn('efficient', 16, key_channels=12, value_channels=8, num_heads=4)
    check_against_reference(m, lambda *a: ref_efficient(*a, heads=4), torch.randn(2, 16, 7, 9), training=False)


@pytest.mark.parametrize('name', IDENTITY_AT_INIT)
def test_starts_as_identity(name):
    x = torch.randn(2, 16, 7, 9)
    torch.testing.assert_close(visattn.create_attn(name, 16).train()(x), x)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize('name, bound', [
    ('cc', lambda h, w, c: h * w * (h + w)), ('efficient', lambda h, w, c: h * w * c),
    ('external', lambda h, w, c: h * w * max(c, 64)), ('ema', lambda h, w, c: h * w * max(c, 64)),
])
def test_no_quadratic_tensor(name, bound):
    """cc stays within O(HW·(H+W)), the linear blocks within O(HW·C): no HW×HW matrix, forward or backward."""
    h, w, c = 24, 40, 8
    m = visattn.create_attn(name, c)
    x = torch.randn(1, c, h, w, requires_grad=True)
    with _LargestTensor() as probe:
        m(x).sum().backward()
    assert probe.numel <= bound(h, w, c) < (h * w) ** 2 // 4


@pytest.mark.parametrize('name', CONTEXT)
def test_meta_and_bf16(name):
    m = visattn.create_attn(name, 32, device='meta')
    assert all(t.device.type == 'meta' for t in [*m.parameters(), *m.buffers()])
    assert m(torch.empty(2, 32, 7, 9, device='meta')).shape == (2, 32, 7, 9)
    m32 = _randomize(visattn.create_attn(name, 32)).eval()
    m16 = visattn.create_attn(name, 32, dtype=torch.bfloat16).eval()
    m16.load_state_dict(m32.state_dict())
    assert all(t.dtype == torch.bfloat16 for t in m16.parameters())
    x = torch.randn(2, 32, 13, 17) * (0.2 if name.startswith('da') else 1.0)
    with torch.no_grad():
        y32, y16 = m32(x), m16(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
    assert (y16.float() - y32).abs().max() <= 0.1 * y32.abs().max()


@pytest.mark.parametrize('name', CONTEXT)
def test_bad_input(name):
    m = visattn.create_attn(name, 8)
    with pytest.raises(ValueError, match='channels'):
        m(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match=r'\[B, C, H, W\]'):
        m(torch.randn(8, 5, 5))
    with pytest.raises(TypeError, match='x must be a torch.Tensor'):
        m([[1.0]])
    with pytest.raises(ValueError, match='channels'):
        visattn.create_attn(name, 0)
    with pytest.raises(TypeError, match='channels'):
        visattn.create_attn(name, 8.0)


@pytest.mark.parametrize('name, kwargs, match', [
    ('cc', dict(recurrence=0), 'recurrence'),
    ('nl', dict(rd_ratio=0.0), 'rd_ratio'),
    ('da', dict(channel_energy='softmax'), 'energy'),
    ('ema', dict(momentum=1.5), 'momentum'),
    ('ema', dict(num_bases=0), 'num_bases'),
    ('external', dict(num_slots=0), 'num_slots'),
    ('efficient', dict(key_channels=6, num_heads=4), 'divisible by num_heads'),
])
def test_bad_arguments(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        visattn.create_attn(name, 16, **kwargs)


@pytest.mark.parametrize('name', CONTEXT)
def test_registry_info_cites_the_paper(name):
    meta = visattn.info(name)
    module = sys.modules[visattn.get_attn(name).__module__]
    assert meta.family == 'context' and meta.kind == 'attn'
    assert f'arXiv:{meta.arxiv}' in module.__doc__


@pytest.mark.parametrize('name', ['cc', 'external'])
def test_as_timm_attn_layer(name):
    import timm

    model = timm.create_model('resnet18', num_classes=3, block_args=dict(attn_layer=visattn.get_attn(name)))
    assert sum(type(m) is visattn.get_attn(name) for m in model.modules()) == 8
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
