"""``features_only=True`` models of the backbones that share `FeatureIntermediates` compile with TorchScript and
give the eager feature maps."""

from __future__ import annotations

import pytest
import timm
import torch

import visattn  # noqa: F401  (registers the models)


@pytest.mark.parametrize('name,kwargs', [
    ('gfnet_ti', dict(img_size=64)), pytest.param('s2mlpv2_small', {}, marks=pytest.mark.slow)])
def test_scripted_feature_extractor_equals_eager(name, kwargs):
    torch.manual_seed(42)
    model = timm.create_model(name, features_only=True, **kwargs).eval()
    size = kwargs.get('img_size', 56)
    x = torch.randn(1, 3, size, size)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        eager, got = model(x), scripted(x)
    assert len(got) == len(eager) > 1
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)
