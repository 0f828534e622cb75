"""Registry-driven tests over every registered feed-forward layer (``kind='ffn'``, timm ViT's ``mlp_layer=``): in a
timm ViT, odd sizes and leading dims, bf16, meta device, float64 gradcheck, TorchScript, torch.fx leaves,
``torch.compile``, argument checks, a batch of 0. A layer joins every test here by being registered; only ``SMALL``
names layers. Plus the README's snippet for timm's own gated MLPs (SwiGLU, GluMlp), which visattn does not copy."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import visattn
from visattn import cli

FFNS = visattn.list_ffns()
DIM = 32

# Sizes that keep each mechanism non-trivial and the float64 checks cheap (several slots read of a larger memory).
SMALL = {
    'pkm': {'heads': 2, 'topk': 3, 'n_keys': 6, 'k_dim': 8},
}


def build(name: str, in_features: int = DIM, hidden_features: int | None = 4 * DIM, **kw) -> nn.Module:
    return visattn.create_ffn(name, in_features, hidden_features, **{**SMALL.get(name, {}), **kw})


def test_registry_and_cli(capsys):
    assert {'pkm', 'boom'} <= set(FFNS)
    for name in FFNS:
        meta, cls = visattn.info(f'ffn:{name}'), visattn.get_ffn(name)
        assert meta.kind == 'ffn' and meta.arxiv and meta.paper and meta.complexity.startswith('O(')
        assert cls.attn_info is meta and cls.__name__ in visattn.ffn.__all__
        assert visattn.get_ffn(cls) is cls and name in visattn.list_ffns(meta.family)
    assert cli.main(['list', '--kind', 'ffn']) == 0
    assert capsys.readouterr().out.split() == [w for n in FFNS for w in ('ffn', n)]
    with pytest.raises(KeyError, match='feed-forward'):
        visattn.get_ffn('pkn')


@pytest.mark.parametrize('name', FFNS)
def test_in_timm_vit_forward_backward(name):
    model = timm.models.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3, mlp_layer=visattn.get_ffn(name))
    mlp = model.blocks[0].mlp
    assert isinstance(mlp, visattn.get_ffn(name))
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    out.square().sum().backward()
    missing = [n for n, p in mlp.named_parameters() if p.grad is None]
    assert not missing, f'{name} parameters without gradient: {missing}'
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert any(p.grad.abs().sum() > 0 for p in mlp.parameters())


@pytest.mark.parametrize('name', FFNS)
def test_timm_block_arguments_are_taken(name):
    """What timm's ``Block`` passes: ``norm_layer`` (``scale_mlp_norm=True``), ``bias=proj_bias``, ``drop=proj_drop``,
    an activation; each builds and runs."""
    model = timm.models.VisionTransformer(
        img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0, scale_mlp_norm=True,
        proj_bias=False, proj_drop_rate=0.1, act_layer='silu', mlp_layer=visattn.get_ffn(name))
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 32)


@pytest.mark.parametrize('name', FFNS)
def test_odd_sizes_and_leading_dims(name):
    m = build(name, 60, 120, out_features=17)
    x = torch.randn(1, 63, 60, requires_grad=True)
    out = m(x)
    assert out.shape == (1, 63, 17) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    m.eval()
    x4 = torch.randn(2, 3, 5, 60)
    torch.testing.assert_close(m(x4), m(x4.reshape(30, 60)).reshape(2, 3, 5, 17))
    assert m(x4[0, 0, 0]).shape == (17,)


@pytest.mark.parametrize('name', FFNS)
def test_bf16_forward(name):
    m = build(name).eval()
    low = build(name, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for t in m.parameters():
            t.copy_(t.bfloat16().float())
    low.load_state_dict(m.state_dict())
    x = torch.randn(2, 17, DIM).bfloat16()
    out = low(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 17, DIM) and torch.isfinite(out).all()
    want = m(x.float())  # 16-bit queries may swap a near-tied k-th slot: a few per cent off, not more
    assert ((out.float() - want).norm() / want.norm()).item() < 0.15
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert torch.isfinite(m(x.float())).all()


@pytest.mark.parametrize('name', FFNS)
def test_meta_device(name):
    by_argument = build(name, device='meta')
    with torch.device('meta'):
        by_context = build(name)
    for m in (by_argument, by_context):
        assert all(t.device.type == 'meta' for t in list(m.parameters()) + list(m.buffers()))
    assert [t.shape for t in by_argument.parameters()] == [t.shape for t in build(name).parameters()]
    out = by_argument.eval()(torch.randn(2, 7, DIM, device='meta'))
    assert out.shape == (2, 7, DIM) and out.device.type == 'meta'


@pytest.mark.parametrize('name', FFNS)
@pytest.mark.parametrize('training', [False, True])
def test_float64_gradcheck(name, training):
    """Gradients of the input and of every parameter (the product-key memory's choice of slots is constant near a
    generic input: its piecewise-smooth function is checked like any other)."""
    m = build(name, 8, 24, dtype=torch.float64).train(training)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    params = [p for p in m.parameters()]

    def fn(inp, *ps):
        return torch.func.functional_call(m, {n: p for (n, _), p in zip(m.named_parameters(), ps)}, (inp,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize('name', FFNS)
def test_scripts_and_matches_eager(name):
    m = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        scripted = torch.jit.script(m)
    for training in (True, False):
        m.train(training), scripted.train(training)
        x = torch.randn(2, 9, DIM)
        torch.testing.assert_close(scripted(x), m(x), rtol=0, atol=1e-6)
    with pytest.raises(torch.jit.Error, match=str(DIM)):
        scripted(torch.randn(2, 9, DIM + 1))


@pytest.mark.slow
@pytest.mark.parametrize('name', FFNS)
def test_compiles_without_graph_breaks(name):
    """Training forward and backward under ``torch.compile(fullgraph=True)`` equal eager's (a twin with the same
    state: training updates BatchNorm's running statistics in place)."""
    torch._dynamo.reset()
    m = build(name)
    twin = copy.deepcopy(m)
    x = torch.randn(2, 9, DIM, requires_grad=True)
    eager = m(x)
    g_eager = torch.autograd.grad(eager.square().sum(), [x] + list(m.parameters()))
    out = torch.compile(twin, fullgraph=True, backend='aot_eager')(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    g_comp = torch.autograd.grad(out.square().sum(), [x] + list(twin.parameters()))
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a.to_dense() if a.is_sparse else a, b.to_dense() if b.is_sparse else b,
                                   rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize('name', FFNS)
def test_is_a_leaf_of_timms_fx_tracer(name):
    model = timm.models.VisionTransformer(
        img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0,
        mlp_layer=visattn.get_ffn(name)).eval()
    extractor = timm.models.create_feature_extractor(model, return_nodes={'blocks.0.mlp': 'mlp'})
    seen = {}
    model.blocks[0].mlp.register_forward_hook(lambda mod, args, out: seen.setdefault('mlp', out))
    x = torch.randn(2, 3, 16, 16)
    model(x)
    torch.testing.assert_close(extractor(x)['mlp'], seen['mlp'])


def _numeric_args(cls: type) -> list[str]:
    """Constructor arguments documented as numbers: an int or float default (not a bool) or ``int | None``."""
    names = ['in_features']
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name in ('self', 'in_features'):
            continue
        default, annotation = p.default, str(p.annotation)
        if (isinstance(default, (int, float)) and not isinstance(default, bool)) or annotation == 'int | None':
            names.append(p.name)
    return names


@pytest.mark.parametrize('name', FFNS)
def test_bad_arguments_are_named(name):
    cls = visattn.get_ffn(name)
    args = _numeric_args(cls)
    assert {'in_features', 'hidden_features', 'out_features', 'drop'} <= set(args)
    base = {'hidden_features': 4 * DIM, **SMALL.get(name, {})}
    for arg in args:
        for value in (0, -1, 'x'):
            kw = {**base, arg: value}
            in_features = kw.pop('in_features', DIM)
            if value == 0 and arg == 'drop':
                assert cls(in_features, **kw)(torch.randn(2, 4, DIM)).shape == (2, 4, DIM)
                continue
            with pytest.raises((ValueError, TypeError)) as info:
                cls(in_features, **kw)
            msg = str(info.value)
            assert arg in msg, f'{name}({arg}={value!r}) raised without naming {arg}: {msg}'
            if info.type is ValueError:
                assert str(value) in msg, f'{name}({arg}={value!r}) did not say which value it refused: {msg}'
    for bad in ({'drop': 1.5}, {'drop': (0.1, 0.2, 0.3)}, {'bias': 'yes'}):
        with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
            cls(DIM, **{**base, **bad})
    with pytest.raises(ValueError, match=f'{cls.__name__}.*{DIM}'):
        build(name)(torch.randn(2, 4, DIM + 1))


@pytest.mark.parametrize('name', FFNS)
def test_batch_of_zero(name):
    m = build(name)
    for training in (False, True):
        m.train(training)
        x = torch.randn(0, 5, DIM, requires_grad=True)
        out = m(x)
        assert out.shape == (0, 5, DIM)
        out.sum().backward()


def test_readme_glu_variants_are_timms():
    """The README's snippet: timm's gated MLPs are ``mlp_layer=`` classes already. ``SwiGLU`` takes the ViT's
    ``act_layer`` (GELU unless told: pass SiLU for SwiGLU) and computes ``fc2(act(fc1_g x) * fc1_x x)``; ``GluMlp``
    splits one ``fc1`` of ``hidden_features`` into value and gate halves (the gate gets the activation)."""
    from timm.layers import GluMlp, SwiGLU

    swiglu = timm.models.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_layer=SwiGLU, act_layer=nn.SiLU,
        mlp_ratio=8 / 3)
    glu = timm.models.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_layer=GluMlp, act_layer=nn.Sigmoid)
    for model in (swiglu, glu):
        model(torch.randn(2, 3, 32, 32)).sum().backward()
    mlp, x = swiglu.blocks[0].mlp, torch.randn(5, 32)
    assert mlp.fc1_g.out_features == int(32 * 8 / 3) and isinstance(mlp.act, nn.SiLU)
    torch.testing.assert_close(mlp(x), mlp.fc2(F.silu(mlp.fc1_g(x)) * mlp.fc1_x(x)))
    mlp = glu.blocks[0].mlp
    value, gate = mlp.fc1(x).chunk(2, dim=-1)
    assert mlp.fc1.out_features == 128 and mlp.fc2.in_features == 64
    torch.testing.assert_close(mlp(x), mlp.fc2(value * torch.sigmoid(gate)))
