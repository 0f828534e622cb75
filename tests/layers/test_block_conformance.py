"""Every registered 2-D block, driven by the registry: numeric constructor arguments are refused at construction with
a ValueError/TypeError naming them and the value given (or, where the table below says so, accepted and usable); a
batch of 0 works forward and backward; the block builds and runs on the meta device; and
``torch.autograd.gradcheck`` passes in float64 on the input in eval mode at an odd 5×7 map (which a block computing
in float32 inside cannot pass)."""

import inspect
import sys
from pathlib import Path

import pytest
import torch

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from _block_args import SMALL  # noqa: E402
from _random_params import randomize  # noqa: E402

C = 8
HW = (5, 7)
BLOCKS = visattn.list_attn()

# values below 1 that an argument legitimately takes (each is checked to build and run)
ALLOWED = {
    ('bam', 'num_dilated_convs'): (0,),  # the spatial branch without dilated convolutions
    ('bat', 'drop_rate'): (0.,),  # no dropout on the residual branch
    ('eca', 'beta'): (0, -1),  # the offset b of the adaptive kernel size is any real number
    ('ecam', 'beta'): (0, -1), ('ceca', 'beta'): (0, -1),  # ECA's variants: the same kernel size
    ('afno', 'sparsity_threshold'): (0.,),  # no soft threshold (the released AFNONet's fno_softshrink=0)
    ('ema', 'momentum'): (0.,),  # the bases follow the batch without memory
    ('ge', 'extent'): (0,),  # the global gather
    ('halo', 'halo_size'): (0,),  # blocks without a halo
    ('sk', 'min_rd_channels'): (0,),  # no floor on the fuse layer's width
    ('outlook', 'attn_drop'): (0.,), ('outlook', 'proj_drop'): (0.,),  # no dropout
    ('mobilevit', 'attn_drop'): (0.,), ('mobilevit', 'drop'): (0.,), ('mobilevit', 'drop_path'): (0.,),
    ('na', 'attn_drop'): (0.,), ('na', 'proj_drop'): (0.,),  # no dropout
    ('window', 'shift_size'): (0,), ('window_v2', 'shift_size'): (0,),  # W-MSA: windows not shifted
    ('window', 'attn_drop'): (0.,), ('window', 'proj_drop'): (0.,),  # no dropout
    ('window_v2', 'attn_drop'): (0.,), ('window_v2', 'proj_drop'): (0.,),
}
# blocks whose gradcheck needs a non-default, differentiable configuration (see test_ema_default_is_not_differentiable)
GRADCHECK = {
    'ema': dict(em_grad=True),
    'ham': dict(rand_init=False, one_step_grad=False),  # fixed bases, gradient through every NMF step
}


def numeric_args(name: str) -> list[tuple[str, int | float]]:
    """The keyword-only constructor arguments of a block whose default is an int or a float (not a bool)."""
    params = inspect.signature(visattn.get_attn(name).__init__).parameters.values()
    return [(p.name, p.default) for p in params if p.kind is p.KEYWORD_ONLY
            and isinstance(p.default, (int, float)) and not isinstance(p.default, bool)]


def build(name: str, **kwargs) -> torch.nn.Module:
    return visattn.create_attn(name, C, **{**SMALL.get(name, {}), **kwargs})


ARG_CASES = [(name, arg, default) for name in BLOCKS for arg, default in numeric_args(name)]


def test_the_registry_drives_the_argument_cases():
    assert len(BLOCKS) >= 18 and len(ARG_CASES) >= 40
    assert {(n, a) for n, a, _ in ARG_CASES} >= set(ALLOWED), 'a table entry names no numeric argument'


@pytest.mark.parametrize('name,arg,default', ARG_CASES, ids=[f'{n}-{a}' for n, a, _ in ARG_CASES])
def test_numeric_arguments_are_checked_at_construction(name, arg, default):
    negative = -1 if isinstance(default, int) else -0.5
    for value in (type(default)(0), negative):
        if value in ALLOWED.get((name, arg), ()):
            m = build(name, **{arg: value}).eval()
            y = m(torch.randn(2, C, *HW))
            assert torch.isfinite(y).all(), (arg, value)
            continue
        with pytest.raises((ValueError, TypeError)) as err:
            build(name, **{arg: value})
        msg = str(err.value)
        assert arg in msg and 'got' in msg and str(value) in msg.rsplit('got', 1)[1], msg
    with pytest.raises(TypeError) as err:
        build(name, **{arg: 'x'})
    assert arg in str(err.value) and "'x'" in str(err.value), str(err.value)


@pytest.mark.parametrize('name,kwargs,arg', [
    ('cbam', dict(spatial_kernel_size=4), 'spatial_kernel_size'),
    ('da', dict(channel_energy='both'), 'channel_energy'),
    ('sk', dict(kernel_size=4), 'kernel_size'),
    ('sk', dict(dilations=(1, 0)), 'dilations'),
    ('sasa', dict(kernel_size=4), 'kernel_size'),
    ('halo', dict(pad_mode='same'), 'pad_mode'),
    ('halo', dict(compat='lucidrains'), 'compat'),
    ('halo', dict(compat='timm', stride=4, block_size=8), 'stride'),
    ('bam', dict(rd_channels=0), 'rd_channels'),
])
def test_other_arguments_are_named(name, kwargs, arg):
    """Arguments the signature scan does not reach (non-int defaults, parity, choices) name themselves too."""
    with pytest.raises((ValueError, TypeError), match=arg):
        build(name, **kwargs)


@pytest.mark.parametrize('name', BLOCKS)
def test_batch_of_zero(name):
    m = build(name).eval()
    want = m(torch.randn(1, C, *HW)).shape[1:]
    x = torch.randn(0, C, *HW, requires_grad=True)
    y = m(x)
    assert y.shape == (0, *want)
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize('name', BLOCKS)
def test_builds_and_runs_on_meta(name):
    want = build(name).eval()(torch.randn(2, C, *HW)).shape
    m = build(name, device='meta').eval()
    assert all(t.is_meta for t in [*m.parameters(), *m.buffers()])
    y = m(torch.randn(2, C, *HW, device='meta'))
    assert y.is_meta and y.shape == want


def _random_block(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build(name, dtype=torch.float64, **kwargs)
    # random weights (norm weights around 1): no zero-initialised residual weight (γ of CC/DA, GC's last conv, the
    # non-local norm) leaves a term out of the check
    return randomize(m, 0.3, lambda n, p: p.dim() == 1 and n.endswith('weight')).eval()


@pytest.mark.parametrize('name', BLOCKS)
def test_gradcheck_float64(name):
    m = _random_block(name, **GRADCHECK.get(name, {}))
    x = torch.randn(1, C, *HW, dtype=torch.float64, requires_grad=True)
    assert m(x).dtype == torch.float64
    assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_ema_default_is_not_differentiable():
    """EMA's default (em_grad=False, as the released code) runs the EM iterations without autograd: by design its
    input gradient leaves out the path through the bases, so it differs from the true one (em_grad=True, gradchecked
    above)."""
    m, exact = _random_block('ema'), _random_block('ema', em_grad=True)
    x = torch.randn(1, C, *HW, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(x)
    (got,) = torch.autograd.grad(m(x), x, g)
    (want,) = torch.autograd.grad(exact(x), x, g)
    assert not torch.allclose(got, want, rtol=1e-3, atol=1e-6)
