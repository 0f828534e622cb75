"""SE, ECA, CBAM, BAM, SK and GC against float64 references written from their papers' equations, against
timm's modules where timm has the mechanism (weights copied across), and on odd sizes, bf16, meta, bad input."""

import math
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers.cbam import CbamModule
from timm.layers.eca import EcaModule
from timm.layers.global_context import GlobalContext
from timm.layers.selective_kernel import SelectiveKernel
from timm.layers.squeeze_excite import SEModule

import visattn
from visattn.layers import eca_kernel_size

sys.path.insert(0, str(Path(__file__).parent))
from _random_params import randomize  # noqa: E402

# every registered channel or spatial block (a new one joins the contract tests below by being registered), and GC
GATING = visattn.list_attn(family='channel') + visattn.list_attn(family='spatial') + ['gc']
# blocks whose batch norm runs over pooled [B, C, 1, 1] vectors: training needs a batch of two or more
POOLED_BATCH_NORM = {'bam', 'sk', 'splat'}


def _randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Random parameters and BN statistics, so that zero-initialised parts cannot hide a wrong formula."""
    return randomize(module, 0.5, lambda name, p: name.endswith('weight') and p.dim() == 1)


def _p(module, name):
    return dict(module.named_parameters())[name]


def _bn(x, module, prefix, training):
    """Batch norm over dim 1 of x, with the module's affine parameters and running statistics."""
    w, b = _p(module, prefix + '.weight'), _p(module, prefix + '.bias')
    bufs = dict(module.named_buffers())
    shape = [1, -1] + [1] * (x.dim() - 2)
    if training:
        dims = [d for d in range(x.dim()) if d != 1]
        mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
    else:
        mean, var = bufs[prefix + '.running_mean'].view(shape), bufs[prefix + '.running_var'].view(shape)
    return (x - mean) / torch.sqrt(var + 1e-5) * w.view(shape) + b.view(shape)


def _fc(x, module, prefix, bias=True):
    """A 1×1 conv / fully connected layer on [B, C] vectors."""
    w = _p(module, prefix + '.weight').flatten(1)
    y = x @ w.T
    return y + _p(module, prefix + '.bias') if bias else y


# ----- references from the papers' equations (x: [B, C, H, W], float64) -----

def ref_se(x, m):
    s = x.mean((2, 3))
    e = torch.sigmoid(_fc(torch.relu(_fc(s, m, 'fc1')), m, 'fc2'))
    return x * e[:, :, None, None]


def ref_eca(x, m):
    w = _p(m, 'conv.weight').view(-1)
    k = w.numel()
    s = x.mean((2, 3))
    padded = F.pad(s, ((k - 1) // 2, (k - 1) // 2))
    y = sum(w[t] * padded[:, t:t + s.shape[1]] for t in range(k))
    return x * torch.sigmoid(y)[:, :, None, None]


def ref_cbam(x, m, training=False):
    def mlp(v):
        return _fc(torch.relu(_fc(v, m, 'channel.fc1')), m, 'channel.fc2')

    mc = torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))
    f1 = x * mc[:, :, None, None]
    pooled = torch.cat([f1.mean(1, keepdim=True), f1.amax(1, keepdim=True)], 1)
    w = _p(m, 'spatial.conv.conv.weight')
    ms = torch.sigmoid(_bn(F.conv2d(pooled, w, padding=w.shape[-1] // 2), m, 'spatial.conv.bn', training))
    return f1 * ms


def ref_bam(x, m, combine='sum', dilation=4, training=False):
    hid = _fc(x.mean((2, 3)), m, 'channel_att.0')
    hid = torch.relu(_bn(hid, m, 'channel_att.1', training))
    mc = _fc(hid, m, 'channel_att.3')[:, :, None, None]
    h = torch.relu(_bn(F.conv2d(x, _p(m, 'spatial_att.0.weight'), _p(m, 'spatial_att.0.bias')), m, 'spatial_att.1',
                       training))
    for i in (3, 6):
        h = F.conv2d(h, _p(m, f'spatial_att.{i}.weight'), _p(m, f'spatial_att.{i}.bias'), padding=dilation,
                     dilation=dilation)
        h = torch.relu(_bn(h, m, f'spatial_att.{i + 1}', training))
    ms = F.conv2d(h, _p(m, 'spatial_att.9.weight'), _p(m, 'spatial_att.9.bias'))
    att = mc + ms if combine == 'sum' else mc * ms
    return x * (1 + torch.sigmoid(att))


def ref_sk(x, m, groups, stride=1, training=False):
    feats = []
    for i in range(m.num_branches):
        d = i + 1
        u = F.conv2d(x, _p(m, f'branches.{i}.0.weight'), stride=stride, padding=d, dilation=d, groups=groups)
        feats.append(torch.relu(_bn(u, m, f'branches.{i}.1', training)))
    s = sum(feats).mean((2, 3))
    z = torch.relu(_bn(_fc(s, m, 'fc_reduce', bias=False), m, 'bn', training))
    logits = _fc(z, m, 'fc_select', bias=False).view(x.shape[0], m.num_branches, -1)
    a = torch.softmax(logits, dim=1)
    return sum(a[:, i, :, None, None] * feats[i] for i in range(m.num_branches))


def ref_gc(x, m):
    B, C, H, W = x.shape
    logits = torch.einsum('bchw,c->bhw', x, _p(m, 'conv_attn.weight').view(C)) + _p(m, 'conv_attn.bias')
    w = torch.softmax(logits.reshape(B, H * W), dim=1)
    context = torch.einsum('bcn,bn->bc', x.reshape(B, C, H * W), w)
    h = _fc(context, m, 'mlp_add.fc1')
    h = (h - h.mean(1, keepdim=True)) / torch.sqrt(h.var(1, unbiased=False, keepdim=True) + 1e-5)
    h = torch.relu(h * _p(m, 'mlp_add.norm.weight') + _p(m, 'mlp_add.norm.bias'))
    return x + _fc(h, m, 'mlp_add.fc2')[:, :, None, None]


def _check_against_reference(module, ref, x, training=False):
    """Output and every gradient (input and parameters) of ``module`` equal those of ``ref``."""
    module = _randomize(module.double()).train(training)
    x = x.double().requires_grad_()
    out = module(x)
    expected = ref(x, module)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    params = [p for p in module.parameters()]
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x] + params, g, allow_unused=True)
    grads_ref = torch.autograd.grad(expected, [x] + params, g, allow_unused=True)
    names = ['x'] + [n for n, _ in module.named_parameters()]
    for name, a, b in zip(names, grads, grads_ref):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=f'gradient of {name}')


@pytest.mark.parametrize('hw', [(7, 9), (13, 17)])
def test_se_reference(hw):
    _check_against_reference(visattn.create_attn('se', 32), ref_se, torch.randn(2, 32, *hw))


@pytest.mark.parametrize('channels', [24, 64])
def test_eca_reference(channels):
    _check_against_reference(visattn.create_attn('eca', channels), ref_eca, torch.randn(2, channels, 7, 9))


@pytest.mark.parametrize('training', [False, True])
def test_cbam_reference(training):
    m = visattn.create_attn('cbam', 32)
    _check_against_reference(m, lambda x, m: ref_cbam(x, m, training), torch.randn(3, 32, 7, 9), training)


@pytest.mark.parametrize('combine', ['sum', 'product'])
@pytest.mark.parametrize('training', [False, True])
def test_bam_reference(combine, training):
    m = visattn.create_attn('bam', 64, combine=combine)
    _check_against_reference(m, lambda x, m: ref_bam(x, m, combine, training=training), torch.randn(3, 64, 13, 17),
                             training)


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('training', [False, True])
def test_sk_reference(stride, training):
    m = visattn.create_attn('sk', 32, groups=4, stride=stride)
    _check_against_reference(m, lambda x, m: ref_sk(x, m, 4, stride, training), torch.randn(3, 32, 7, 9), training)


def test_gc_reference():
    _check_against_reference(visattn.create_attn('gc', 32), ref_gc, torch.randn(2, 32, 7, 9))


# ----- against timm's modules, weights copied across -----

def _copy_in_order(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Copy src's state into dst tensor by tensor, in registration order (shapes must agree)."""
    s, d = list(src.state_dict().values()), dst.state_dict()
    assert len(s) == len(d)
    for (key, mine), theirs in zip(d.items(), s):
        assert mine.shape == theirs.shape, key
    dst.load_state_dict(dict(zip(d, s)))


@pytest.mark.parametrize('name, channels, theirs, ours_kw', [
    ('se', 64, lambda: SEModule(64, rd_ratio=1 / 16, rd_divisor=1), {}),
    ('eca', 256, lambda: EcaModule(256), {}),
    ('cbam', 64, lambda: CbamModule(64, rd_ratio=1 / 16), dict(mlp_bias=False)),
    ('gc', 64, lambda: GlobalContext(64, fuse_add=True, fuse_scale=False, rd_ratio=1 / 16), {}),
    ('gc', 64, lambda: GlobalContext(64, fuse_add=False, fuse_scale=True, rd_ratio=1 / 16),
     dict(fuse_add=False, fuse_scale=True)),
    ('sk', 64, lambda: SelectiveKernel(64, 64, kernel_size=[3, 5], groups=32, rd_channels=32, split_input=False),
     {}),
])
def test_matches_timm(name, channels, theirs, ours_kw):
    theirs = _randomize(theirs()).eval()
    ours = visattn.create_attn(name, channels, **ours_kw).eval()
    if name == 'sk':
        _copy_in_order(theirs, ours)
    else:
        ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, channels, 7, 9)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_eca_kernel_size_formula():
    # k = |log2(C)/2 + 1/2|_odd: 5, 5, 5, 7 for ResNet-50's 256..2048 channels (REFERENCES.md), 3 for 64
    for c in (64, 128, 256, 512, 1024, 2048, 4096):
        t = (math.log2(c) + 1) / 2
        expected = int(t) if int(t) % 2 else int(t) + 1
        assert eca_kernel_size(c) == max(expected, 3)
    assert [eca_kernel_size(c) for c in (256, 512, 1024, 2048)] == [5, 5, 5, 7]
    assert visattn.create_attn('eca', 64, kernel_size=7).conv.weight.numel() == 7


# ----- the contract every gating block keeps -----

@pytest.mark.parametrize('name', GATING)
@pytest.mark.parametrize('training', [False, True])
def test_odd_sizes_and_modes(name, training):
    m = visattn.create_attn(name, 64).train(training)
    for shape in [(2, 64, 7, 9), (2, 64, 1, 1), (2, 64, 13, 17)]:
        x = torch.randn(*shape, requires_grad=True)
        y = m(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
        y.square().mean().backward()
        assert torch.isfinite(x.grad).all()
    if training:
        assert all(p.grad is not None for p in m.parameters()), name


@pytest.mark.parametrize('name', GATING)
def test_batch_one(name):
    m = visattn.create_attn(name, 64).eval()
    x = torch.randn(1, 64, 7, 9)
    with torch.no_grad():
        y1 = m(x)
        y2 = m(torch.cat([x, torch.randn_like(x)]))[:1]
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)  # in eval mode each image is independent
    m.train()
    if name in POOLED_BATCH_NORM:  # their batch norm over [B, C, 1, 1] vectors needs two images to train
        with pytest.raises(ValueError, match='batch of at least 2'):
            m(x)
    else:
        assert m(x).shape == x.shape


@pytest.mark.parametrize('name', GATING)
def test_meta_and_bf16(name):
    m = visattn.create_attn(name, 64, device='meta')
    assert all(p.device.type == 'meta' for p in m.parameters())
    assert m(torch.empty(2, 64, 7, 9, device='meta')).shape == (2, 64, 7, 9)
    m32 = visattn.create_attn(name, 64).eval()
    m16 = visattn.create_attn(name, 64, dtype=torch.bfloat16).eval()
    m16.load_state_dict(m32.state_dict())
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    x = torch.randn(2, 64, 7, 9)
    with torch.no_grad():
        y16 = m16(x.bfloat16())
        y32 = m32(x)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.05)


@pytest.mark.parametrize('name', GATING)
def test_bad_input(name):
    m = visattn.create_attn(name, 64)
    with pytest.raises(ValueError, match='expected 64'):
        m(torch.randn(2, 32, 7, 9))
    with pytest.raises(ValueError, match='4 dims'):
        m(torch.randn(2, 64, 7))
    with pytest.raises((TypeError, ValueError), match='channels'):
        visattn.create_attn(name, 0)


def test_bad_arguments():
    with pytest.raises(ValueError, match='combine'):
        visattn.create_attn('bam', 64, combine='max')
    with pytest.raises(ValueError, match='groups'):
        visattn.create_attn('sk', 48)
    with pytest.raises(ValueError, match='kernel_size'):
        visattn.create_attn('eca', 64, kernel_size=4)
    with pytest.raises(ValueError, match='pooling'):
        visattn.create_attn('gc', 64, pooling='max')
    with pytest.raises(ValueError, match='rd_ratio'):
        visattn.create_attn('se', 64, rd_ratio=0)


def test_sk_stride_and_out_channels():
    m = visattn.create_attn('sk', 64, out_channels=128, stride=2).eval()
    assert m(torch.randn(2, 64, 7, 9)).shape == (2, 128, 4, 5)


def test_gc_starts_as_identity():
    m = visattn.create_attn('gc', 64)
    x = torch.randn(2, 64, 7, 9)
    torch.testing.assert_close(m(x), x)


@pytest.mark.parametrize('name', GATING)
def test_as_timm_attn_layer(name):
    model = timm.create_model('resnet18', num_classes=3, block_args=dict(attn_layer=visattn.get_attn(name)))
    assert sum(type(m) is visattn.get_attn(name) for m in model.modules()) == 8
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize('name', GATING)
def test_inference_path_matches_autograd_path(name):
    """Blocks that update intermediates in place when autograd does not need them give the same values."""
    m = _randomize(visattn.create_attn(name, 64)).eval()
    x = torch.randn(2, 64, 7, 9)
    x_before = x.clone()
    with torch.inference_mode():
        fast = m(x)
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)  # the input is never overwritten
    torch.testing.assert_close(fast, m(x.requires_grad_()).detach())


@pytest.mark.parametrize('name', ['se', 'cbam'])
def test_module_path_matches_fused_op_path(name):
    """SE and CBAM's channel gate run through visattn.ops.channel_gate; their plain module path (taken for other
    activations or gates) computes the same function."""
    m = _randomize(visattn.create_attn(name, 64)).eval()
    gate = m if name == 'se' else m.channel
    x = torch.randn(2, 64, 7, 9)
    fused = m(x)
    gate.fused_act = None
    torch.testing.assert_close(m(x), fused)


def test_eca_with_another_gate():
    m = _randomize(visattn.create_attn('eca', 64, gate_layer=torch.nn.Hardsigmoid)).eval()
    x = torch.randn(2, 64, 7, 9)
    with torch.no_grad():
        m.conv.weight.mul_(1e-3)  # hard-sigmoid is linear near 0: 1/2 + t/6
    y = m(x)
    s = torch.nn.functional.conv1d(x.mean((2, 3)).unsqueeze(1), m.conv.weight, padding=m.kernel_size // 2)
    torch.testing.assert_close(y, x * (0.5 + s.squeeze(1) / 6)[:, :, None, None])


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_cbam_forward_add_is_cbam_plus_shortcut(dtype):
    """``Cbam.forward_add(x, shortcut)`` (a residual block's fused tail) is ``cbam(x) + shortcut``, with autograd
    (same gradients) and in inference (where it may overwrite x)."""
    m = _randomize(visattn.create_attn('cbam', 64)).eval().to(dtype)
    x, shortcut = torch.randn(2, 2, 64, 7, 9, dtype=dtype).unbind(0)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)  # a fused multiply-add
    want = m(x) + shortcut
    with torch.inference_mode():
        got = m.forward_add(x.clone(), shortcut)
    torch.testing.assert_close(got, want, **tol)

    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    ss = [shortcut.clone().requires_grad_(), shortcut.clone().requires_grad_()]
    out_fused, out_plain = m.forward_add(xs[0], ss[0]), m(xs[1]) + ss[1]
    torch.testing.assert_close(out_fused, out_plain, **tol)
    g = torch.randn_like(out_plain)
    grads = [torch.autograd.grad(o, (xi, si, *m.parameters()), g) for o, xi, si in
             ((out_fused, xs[0], ss[0]), (out_plain, xs[1], ss[1]))]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **tol)


def test_cbam_channel_gate_in_place_matches_the_fused_op():
    m = _randomize(visattn.create_attn('cbam', 64)).eval()
    x = torch.randn(2, 64, 7, 9)
    want = m.channel(x)
    with torch.inference_mode():
        y = x.clone()
        got = m.channel(y, inplace=True)
    assert got.data_ptr() == y.data_ptr()  # written into its input
    torch.testing.assert_close(got, want)
