"""The CSRA head against a float64 reference written from the paper's feature-space equations
(``y_i = m_iᵀ (g + λ a^i)``, ``a^i = Σ_j softmax_j(T m_iᵀ x_j) x_j``, T = ∞ as the max), on output and every gradient;
multi-head sums and the paper's temperatures; ``with_csra_head`` on timm's resnet18 (forward, backward, forward_head,
reset_classifier to other classes and to 0, scripting, compile); bad arguments."""

import copy
import math
import warnings

import pytest
import timm
import torch

from visattn.layers import CSRAHead, with_csra_head
from visattn.layers.csra import CSRA_TEMPERATURES


def ref_csra(x, weight, num_classes, temperatures, lam, normalize=False):
    """Σ over the heads h of m_iᵀ g + λ (m_iᵀ a^i) (T finite) or λ max_j m_iᵀ x_j (T = ∞); m_i the rows of head h."""
    B, C, H, W = x.shape
    feats = x.reshape(B, C, H * W)  # x_j: [B, C, N]
    g = feats.mean(2)  # class-agnostic average-pooled feature: [B, C]
    out = 0
    for h, t in enumerate(temperatures):
        m = weight[h * num_classes:(h + 1) * num_classes]  # [K, C]
        if normalize:
            m = m / torch.sqrt((m * m).sum(1, keepdim=True))
        scores = torch.einsum('kc,bcn->bkn', m, feats)  # m_iᵀ x_j
        base = g @ m.T
        if math.isinf(t):
            att = scores.amax(2)
        else:
            e = torch.exp(t * scores - (t * scores).amax(2, keepdim=True))
            s = e / e.sum(2, keepdim=True)  # s_j^i
            a = torch.einsum('bkn,bcn->bkc', s, feats)  # class-specific features a^i: [B, K, C]
            att = torch.einsum('bkc,kc->bk', a, m)
        out = out + base + lam * att
    return out


def _check(head, x, **ref_kw):
    head = head.double()
    with torch.no_grad():
        head.weight.normal_()
    x = x.double().requires_grad_()
    y = head(x)
    want = ref_csra(x, head.weight, head.num_classes, head.temperatures, head.lam, head.normalize, **ref_kw)
    torch.testing.assert_close(y, want, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, head.weight), g)
    expected = torch.autograd.grad(want, (x, head.weight), g)
    for name, a, b in zip(('x', 'weight'), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=f'gradient of {name}')
        assert a.abs().sum() > 0, name


@pytest.mark.parametrize('num_heads, hw', [(1, (7, 9)), (1, (1, 1)), (1, (13, 17)), (2, (7, 9)), (2, (1, 1)),
                                           (4, (13, 17)), (6, (7, 9)), (8, (5, 4)), (8, (1, 1))])
def test_reference_paper_temperatures(num_heads, hw):
    head = CSRAHead(16, 5, num_heads=num_heads, lam=0.3)
    assert head.temperatures == list(CSRA_TEMPERATURES[num_heads])
    _check(head, torch.randn(2, 16, *hw))


@pytest.mark.parametrize('normalize', [False, True])
def test_reference_other_options(normalize):
    head = CSRAHead(12, 4, num_heads=3, lam=0.7, temperatures=(0.5, 3, float('inf')), normalize=normalize)
    _check(head, torch.randn(3, 12, 5, 7))


def test_paper_temperature_settings():
    # the released code's table: H heads, T = 1, 2, ... and the last head T = ∞ (max pooling)
    assert CSRA_TEMPERATURES == {1: (1,), 2: (1, math.inf), 4: (1, 2, 4, math.inf), 6: (1, 2, 3, 4, 5, math.inf),
                                 8: (1, 2, 3, 4, 5, 6, 7, math.inf)}
    head = CSRAHead(8, 3)
    assert (head.num_heads, head.lam, head.temperatures, head.normalize) == (1, 0.1, [1.0], False)


def test_multi_head_is_the_sum_of_its_heads():
    torch.manual_seed(0)
    multi = CSRAHead(8, 3, num_heads=2, lam=0.2)
    heads = [CSRAHead(8, 3, lam=0.2, temperatures=(t,)) for t in (1, math.inf)]
    with torch.no_grad():
        for i, h in enumerate(heads):
            h.weight.copy_(multi.weight[3 * i:3 * (i + 1)])
    x = torch.randn(2, 8, 5, 7)
    torch.testing.assert_close(multi(x), heads[0](x) + heads[1](x))


def test_limits_of_temperature_and_lambda():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64)
    hot = CSRAHead(8, 3, temperatures=(1e4,), dtype=torch.float64)
    cold = CSRAHead(8, 3, temperatures=(math.inf,), dtype=torch.float64)
    cold.load_state_dict(hot.state_dict())
    torch.testing.assert_close(hot(x), cold(x), rtol=1e-4, atol=1e-4)  # T → ∞ is the max
    plain = CSRAHead(8, 3, lam=0, dtype=torch.float64)
    plain.load_state_dict(hot.state_dict())
    torch.testing.assert_close(plain(x), x.mean((2, 3)) @ plain.weight.T)  # λ = 0: average pooling + classifier
    normalized = CSRAHead(8, 3, lam=0, normalize=True, dtype=torch.float64)
    normalized.load_state_dict(hot.state_dict())
    torch.testing.assert_close(normalized(x), plain(x) / plain.weight.norm(dim=1))


def test_bf16_meta_script_compile():
    head = CSRAHead(16, 5, num_heads=4)
    x = torch.randn(2, 16, 5, 7)
    h16 = copy.deepcopy(head).bfloat16()
    y16 = h16(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), head(x), rtol=0.05, atol=0.05)
    assert CSRAHead(16, 5, device='meta')(torch.empty(2, 16, 5, 7, device='meta')).shape == (2, 5)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit.script is deprecated, not gone
        torch.testing.assert_close(torch.jit.script(head)(x), head(x))
    torch._dynamo.reset()
    compiled = torch.compile(head, fullgraph=True, backend='aot_eager')
    torch.testing.assert_close(compiled(x), head(x))
    torch._dynamo.reset()


def test_bad_arguments():
    for kwargs, exc, match in [
        (dict(num_classes=0), ValueError, 'num_classes'),
        (dict(num_heads=0), ValueError, 'num_heads'),
        (dict(num_heads=3), ValueError, 'temperatures'),
        (dict(num_heads=2, temperatures=(1.0,)), ValueError, 'temperatures'),
        (dict(temperatures=(0.0,)), ValueError, 'temperatures'),
        (dict(temperatures=(float('nan'),)), ValueError, 'temperatures'),
        (dict(temperatures=1.0), TypeError, 'temperatures'),
        (dict(lam=-0.1), ValueError, 'lam'),
        (dict(lam='x'), TypeError, 'lam'),
        (dict(in_features=0), ValueError, 'in_features'),
    ]:
        args = dict(in_features=8, num_classes=3)
        args.update(kwargs)
        with pytest.raises(exc, match=match):
            CSRAHead(args.pop('in_features'), args.pop('num_classes'), **args)
    with pytest.raises(ValueError, match='expected 8'):
        CSRAHead(8, 3)(torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match='4 dims'):
        CSRAHead(8, 3)(torch.randn(1, 8))


# ----- on a timm CNN -----

def _resnet(num_classes=4, **kw):
    torch.manual_seed(0)
    return with_csra_head(timm.create_model('resnet18', num_classes=num_classes), **kw)


def test_timm_resnet_forward_backward():
    model = _resnet(num_heads=2, lam=0.3)
    assert isinstance(model.fc, CSRAHead) and model.get_classifier() is model.fc
    assert model.global_pool.is_identity() and 'fc.weight' in model.state_dict() and 'fc.bias' not in model.state_dict()
    x = torch.randn(2, 3, 64, 64)
    y = model(x)
    assert y.shape == (2, 4)
    features = model.forward_features(x)
    torch.testing.assert_close(model.forward_head(features), model.fc(features))
    torch.testing.assert_close(y, model.fc(features))
    assert model.forward_head(features, pre_logits=True).shape == features.shape  # the un-pooled map
    y.square().sum().backward()
    assert model.fc.weight.grad.abs().sum() > 0 and model.conv1.weight.grad.abs().sum() > 0


def test_timm_resnet_reset_classifier():
    model = _resnet(num_heads=4, lam=0.5, normalize=True).eval()
    x = torch.randn(2, 3, 64, 64)
    model.reset_classifier(7)
    head = model.fc
    assert isinstance(head, CSRAHead) and model.num_classes == 7 and not head.training
    assert (head.num_heads, head.lam, head.normalize, head.num_classes) == (4, 0.5, True, 7)
    assert model(x).shape == (2, 7)
    model.reset_classifier(0)  # timm's pooled features
    features = model.forward_features(x)
    assert model.num_classes == 0 and isinstance(model.fc, torch.nn.Identity)
    torch.testing.assert_close(model(x), features.mean((2, 3)))
    model.reset_classifier(3)
    assert isinstance(model.fc, CSRAHead) and model(x).shape == (2, 3)
    twin = copy.deepcopy(model)  # the copy resets its own head
    twin.reset_classifier(5)
    assert twin(x).shape == (2, 5) and model(x).shape == (2, 3)
    with pytest.raises(ValueError, match='global_pool'):
        model.reset_classifier(3, global_pool='max')
    with pytest.raises(ValueError, match='num_classes'):
        model.reset_classifier(-1)


def test_timm_resnet_without_classifier_then_reset():
    model = _resnet(num_classes=0).eval()
    assert isinstance(model.fc, torch.nn.Identity)
    model.reset_classifier(6)
    assert isinstance(model.fc, CSRAHead) and model(torch.randn(1, 3, 32, 32)).shape == (1, 6)


def test_timm_resnet_scripts():
    model = _resnet().eval()
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit.script is deprecated, not gone
        scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x))


def test_timm_efficientnet():
    """Another CNN whose forward_head pools then classifies: its classifier is named ``classifier``."""
    model = with_csra_head(timm.create_model('efficientnet_b0', num_classes=3, drop_rate=0.2), num_heads=2).eval()
    assert isinstance(model.classifier, CSRAHead) and 'classifier.weight' in model.state_dict()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model(x), model.classifier(model.forward_features(x)))


def test_with_csra_head_refuses_other_heads():
    with pytest.raises(TypeError, match='global_pool'):
        with_csra_head(timm.create_model('vit_tiny_patch16_224', num_classes=3, img_size=32, depth=1))
    with pytest.raises(TypeError, match='global_pool'):  # pools inside its head module
        with_csra_head(timm.create_model('convnext_atto', num_classes=3))
    with pytest.raises(TypeError, match='nn.Module'):
        with_csra_head('resnet18')
    with pytest.raises(ValueError, match='temperatures'):
        with_csra_head(timm.create_model('resnet18', num_classes=0), num_heads=3)
