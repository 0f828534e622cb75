"""Parameter counts of lambda_resnet50 and botnet50 (built on the meta device) against their papers' ImageNet tables,
and the structure the papers describe."""

import timm
import torch

import visattn  # noqa: F401  (registers the models)
from visattn.layers import BottleneckAttn, LambdaLayer


def _count(name: str, **kwargs) -> int:
    return sum(p.numel() for p in timm.create_model(name, device='meta', **kwargs).parameters())


def test_lambda_resnet50_params_match_paper():
    # LambdaNetworks (arXiv:2102.08602) Table 3: lambda layer (k=16, h=4, u=1, 23×23 scope) in ResNet-50, 15.0M
    n = _count('lambda_resnet50')
    assert round(n / 1e5) / 10 == 15.0, n
    assert n == 14_995_592


def test_botnet50_params_match_paper():
    # BoTNet (arXiv:2101.11605) Table 1 prints BoT50 20.8M and R50 25.5M: truncated to 0.1M (R50 has 25,557,032)
    n = _count('botnet50')
    assert int(n / 1e5) / 10 == 20.8 and int(_count('resnet50') / 1e5) / 10 == 25.5, n
    assert n == 20_852_008


def test_lambda_resnet50_structure():
    m = timm.create_model('lambda_resnet50', device='meta')
    layers = [b.conv2 for s in (m.layer1, m.layer2, m.layer3, m.layer4) for b in s]
    assert len(layers) == 16 and all(isinstance(a, LambdaLayer) for a in layers)
    assert all((a.r, a.dim_qk, a.num_heads, a.pool_size) == (23, 16, 4, 3) for a in layers)
    assert [a.stride for a in layers] == [1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1]
    assert m.conv1.kernel_size == (7, 7)


def test_botnet50_structure():
    m = timm.create_model('botnet50', device='meta')
    attn = [b.conv2 for b in m.layer4]
    assert all(isinstance(a, BottleneckAttn) and a.num_heads == 4 for a in attn)
    assert [a.stride for a in attn] == [2, 1, 1] and [a.feat_size for a in attn] == [(14, 14), (7, 7), (7, 7)]
    assert not any(isinstance(b.conv2, BottleneckAttn) for s in (m.layer1, m.layer2, m.layer3) for b in s)
    assert timm.create_model('botnet50', device='meta', img_size=256).layer4[0].conv2.feat_size == (16, 16)


def test_run_at_224():
    for name in ('lambda_resnet50', 'botnet50'):
        m = timm.create_model(name, num_classes=3).eval()
        with torch.no_grad():
            assert m(torch.randn(1, 3, 224, 224)).shape == (1, 3)


def test_cotnet50_params_match_paper():
    # CoTNet (arXiv:2107.12292): CoTNet-50 22.2M, every 3×3 conv a CoT block (its BN kept, as the released bottleneck)
    from visattn.layers import ContextualTransformer

    m = timm.create_model('cotnet50', device='meta')
    layers = [b.conv2 for s in (m.layer1, m.layer2, m.layer3, m.layer4) for b in s]
    assert len(layers) == 16 and all(isinstance(a, ContextualTransformer) for a in layers)
    assert [a.stride for a in layers] == [1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1]
    n = _count('cotnet50')
    assert round(n / 1e5) / 10 == 22.2, n


def test_acmix_resnet50_structure():
    from visattn.layers import ACmix

    m = timm.create_model('acmix_resnet50', device='meta')
    layers = [b.conv2 for s in (m.layer1, m.layer2, m.layer3, m.layer4) for b in s]
    assert len(layers) == 16 and all(isinstance(a, ACmix) for a in layers)
    assert [a.stride for a in layers] == [1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1]
    # each ACmix replaces a 3×3 conv of width w (9w² weights) by its 1×1 q, k, v, positional conv, fc and shift conv
    assert _count('acmix_resnet50') < _count('resnet50')
