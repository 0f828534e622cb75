"""The Hamburger against a float64 reference with the NMF multiplicative updates written out (initial codes, K steps
on a detached X, the one final code update with autograd, the reconstruction), on output, input and every parameter
gradient, at odd sizes and 1×1, random bases (seeded) and fixed ones, train (6 steps) and eval (7); the one-step
gradient against the full one; the updates lower the factorisation error; groups; bf16; meta; scripting; errors."""

import sys
import warnings
from pathlib import Path

import pytest
import torch
from timm.layers import create_feature_extractor

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from test_context_blocks import _bn, _conv1x1, _randomize, check_against_reference  # noqa: E402

SEED = 7


def nmf_reference(x, bases, steps, one_step=True, inv_t=1.0, eps=1e-6):
    """X ≈ B Cᵀ of x: [G, d, n] (non-negative) from bases [G, d, r]: returns the reconstruction B Cᵀ, [G, d, n]."""
    xi = x.detach() if one_step else x
    coef = torch.softmax(inv_t * torch.einsum('gdn,gdr->gnr', xi, bases), dim=-1)
    for _ in range(steps):
        coef = coef * torch.einsum('gdn,gdr->gnr', xi, bases) / (
            torch.einsum('gnr,gds,gdr->gns', coef, bases, bases) + eps)
        bases = bases * torch.einsum('gdn,gnr->gdr', xi, coef) / (
            torch.einsum('gdr,gns,gnr->gds', bases, coef, coef) + eps)
    if one_step:
        bases, coef = bases.detach(), coef.detach()
    coef = coef * torch.einsum('gdn,gdr->gnr', x, bases) / (torch.einsum('gnr,gds,gdr->gns', coef, bases, bases) + eps)
    return torch.einsum('gdr,gnr->gdn', bases, coef)


def random_bases(groups, depth, rank):
    """The bases the block draws after ``torch.manual_seed(SEED)``: U(0, 1), unit columns."""
    torch.manual_seed(SEED)
    b = torch.rand(groups, depth, rank, dtype=torch.float64)
    return b / b.norm(dim=1, keepdim=True)


def ref_ham(x, P, S, training, rank=4, groups=1, one_step=True, fixed=False):
    b = x.shape[0]
    flat = x.flatten(2)
    z = torch.relu(_conv1x1(flat, P, 'ham_in.conv'))  # lower bread: [B, D, N]
    d = z.shape[1] // groups
    bases = S['bases'].repeat(b, 1, 1) if fixed else random_bases(b * groups, d, rank)
    rec = nmf_reference(z.reshape(b * groups, d, -1), bases, 6 if training else 7, one_step)
    y = _bn(_conv1x1(rec.reshape(z.shape), P, 'ham_out.conv', bias=False), P, S, 'ham_out.bn', training)
    return torch.relu(flat + y).view_as(x)


def _seed(*_):
    torch.manual_seed(SEED)  # returns None: a pre-hook returning a value would replace the input


def _seeded(m):
    """``m`` draws its bases after ``torch.manual_seed(SEED)`` at every call, as `random_bases` does."""
    m.register_forward_pre_hook(_seed)
    return m


@pytest.mark.parametrize('shape', [(2, 16, 7, 9), (1, 16, 13, 17), (2, 16, 1, 1)])
@pytest.mark.parametrize('training', [False, True])
@pytest.mark.parametrize('one_step, fixed', [(True, False), (False, True)])
def test_reference(shape, training, one_step, fixed):
    m = _seeded(visattn.create_attn('ham', shape[1], rank=4, one_step_grad=one_step, rand_init=not fixed))
    check_against_reference(m, lambda *a: ref_ham(*a, one_step=one_step, fixed=fixed), torch.randn(shape),
                            training=training)


def test_reference_groups_and_width():
    m = _seeded(visattn.create_attn('ham', 8, ham_channels=12, num_groups=3, rank=5))
    check_against_reference(m, lambda *a: ref_ham(*a, rank=5, groups=3), torch.randn(2, 8, 5, 7), training=True)


def test_one_step_gradient_is_not_the_full_gradient():
    """The default back-propagates through the last code update only (the paper's one-step gradient): the input
    gradient leaves out the path through the K steps, so it differs from the full one (checked above against the
    written-out updates, and gradchecked in the conformance suite)."""
    torch.manual_seed(0)
    one = _randomize(visattn.create_attn('ham', 8, rank=4, rand_init=False).double()).eval()
    full = visattn.create_attn('ham', 8, rank=4, rand_init=False, one_step_grad=False).double().eval()
    full.load_state_dict(one.state_dict())
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(x)
    y1, y2 = one(x), full(x)
    torch.testing.assert_close(y1, y2)  # the same function
    (g1,) = torch.autograd.grad(y1, x, g)
    (g2,) = torch.autograd.grad(y2, x, g)
    assert not torch.allclose(g1, g2, rtol=1e-3, atol=1e-6)


def test_the_updates_lower_the_factorisation_error():
    torch.manual_seed(0)
    x = torch.rand(3, 16, 40, dtype=torch.float64)
    bases = torch.rand(3, 16, 4, dtype=torch.float64)
    bases = bases / bases.norm(dim=1, keepdim=True)
    errors = [(x - nmf_reference(x, bases, k)).norm() for k in (0, 1, 3, 7, 20)]
    assert all(a >= b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.8 * errors[0]


def test_random_bases_per_forward_and_fixed_bases():
    torch.manual_seed(0)
    m = _randomize(visattn.create_attn('ham', 8, rank=4)).eval()
    x = torch.randn(2, 8, 5, 7)
    with torch.no_grad():
        assert not torch.allclose(m(x), m(x))  # new bases every call, in eval too (the paper)
        torch.manual_seed(3)
        a = m(x)
        torch.manual_seed(3)
        torch.testing.assert_close(m(x), a)
    assert 'bases' not in m.state_dict()
    fixed = visattn.create_attn('ham', 8, rank=4, rand_init=False).eval()
    assert fixed.bases.shape == (1, 8, 4) and 'bases' in fixed.state_dict()
    torch.testing.assert_close(fixed.bases.norm(dim=1), torch.ones(1, 4))
    assert (fixed.bases >= 0).all()
    with torch.no_grad():
        torch.testing.assert_close(fixed(x), fixed(x))
    before = fixed.bases.clone()
    fixed.train()(x)
    assert torch.equal(fixed.bases, before)  # no online update


def test_steps_in_training_and_evaluation():
    m = visattn.create_attn('ham', 8, rank=4, train_steps=2, eval_steps=3, rand_init=False).double()
    x = torch.rand(2, 8, 5, 7, dtype=torch.float64)
    calls = []
    m._update_codes = lambda *a, f=m._update_codes: calls.append(1) or f(*a)
    m.train()(x)
    m.eval()(x)
    assert len(calls) == (2 + 1) + (3 + 1)  # K steps, then the one with the gradient


def test_defaults_and_parameter_count():
    m = visattn.create_attn('ham', 512)
    assert (m.rank, m.train_steps, m.eval_steps, m.inv_t, m.num_groups, m.ham_channels) == (64, 6, 7, 1.0, 1, 512)
    assert m.rand_init and m.one_step_grad and m.bases is None
    # lower bread (conv with bias), upper bread (conv without bias, BN): the released HamburgerV1 at C = D = 512
    assert sum(p.numel() for p in m.parameters()) == 512 * 512 + 512 + 512 * 512 + 2 * 512 == 525824
    assert {'ham_in.conv.weight', 'ham_in.conv.bias', 'ham_out.conv.weight', 'ham_out.bn.weight'} <= set(
        m.state_dict())  # mmseg's Hamburger layout
    meta = visattn.info('ham')
    assert meta.family == 'context' and f'arXiv:{meta.arxiv}' in sys.modules[type(m).__module__].__doc__


def test_bf16_and_meta():
    m32 = _randomize(visattn.create_attn('ham', 32, rank=8, rand_init=False)).eval()
    m16 = visattn.create_attn('ham', 32, rank=8, rand_init=False, dtype=torch.bfloat16).eval()
    m16.load_state_dict(m32.state_dict())
    x = torch.randn(2, 32, 13, 17)
    with torch.no_grad():
        y32, y16 = m32(x), m16(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
    assert (y16.float() - y32).abs().max() <= 0.05 * y32.abs().max()
    for rand_init in (True, False):
        meta = visattn.create_attn('ham', 32, rand_init=rand_init, device='meta')
        assert meta(torch.empty(2, 32, 7, 9, device='meta')).shape == (2, 32, 7, 9)


@pytest.mark.parametrize('rand_init', [True, False])
def test_scripts_and_traces(rand_init):
    m = _randomize(visattn.create_attn('ham', 16, rank=4, rand_init=rand_init)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        scripted = torch.jit.script(m)
    x = torch.randn(2, 16, 7, 9)
    traced = create_feature_extractor(torch.nn.Sequential(m).eval(), ['0'])
    for fn in (scripted, lambda t: traced(t)['0']):
        torch.manual_seed(1)
        got = fn(x)
        torch.manual_seed(1)
        torch.testing.assert_close(got, m(x))


@pytest.mark.parametrize('kwargs, exc, match', [
    (dict(rank=0), ValueError, 'rank'), (dict(train_steps=0), ValueError, 'train_steps'),
    (dict(eval_steps=-1), ValueError, 'eval_steps'), (dict(inv_t=0.0), ValueError, 'inv_t'),
    (dict(eps=0.0), ValueError, 'eps'), (dict(num_groups=3), ValueError, 'num_groups'),
    (dict(ham_channels=0), ValueError, 'ham_channels'), (dict(rank=2.0), TypeError, 'rank'),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        visattn.create_attn('ham', 16, **kwargs)
    with pytest.raises(ValueError, match='expected 16'):
        visattn.create_attn('ham', 16)(torch.randn(1, 8, 3, 3))
