"""``torch.compile(fullgraph=True)`` and ``torch.export`` over every block, mixer and model, driven by the registry.

``fullgraph=True`` fails on any graph break; the ``aot_eager`` backend traces the forward and the backward graphs
as inductor would (AOT autograd) without generating code, so the check is cheap enough for every entry. Outputs and
gradients must equal eager ones within 1e-5. The default run covers one entry of every family; ``-m slow`` all.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import timm
import torch

import visattn
from visattn.mixers import length_kwargs
from visattn.registry import _ENTRIES

sys.path.insert(0, str(Path(__file__).parent / 'layers'))
from _block_args import SMALL  # noqa: E402

C, HW = 16, (5, 7)
DIM, HEADS, N = 32, 4, 24
MODEL_SAMPLE = ['resnet18_cbam', 'resnet18_se', 'sasa_resnet26', 'vit_small_patch16_224_linear',
                'mobilenetv2_100_triplet']


def _first_of_each_family(kind: str) -> set[str]:
    first: dict[str, str] = {}
    for name, (_, meta) in sorted(_ENTRIES[kind].items()):
        first.setdefault(meta.family, name)
    return set(first.values())


def _params(kind: str) -> list:
    names = visattn.list_attn() if kind == 'attn' else visattn.list_mixers()
    sample = _first_of_each_family(kind)
    return [pytest.param(n, marks=() if n in sample else pytest.mark.slow) for n in names]


def _block(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    return visattn.create_attn(name, C, **SMALL.get(name, {})), torch.randn(2, C, *HW)


def _mixer(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    kw = length_kwargs(name, N)
    return visattn.create_mixer(name, DIM, num_heads=HEADS, **kw), torch.randn(2, N, DIM)


def _call(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)  # mechanisms that draw random numbers draw the same ones in both runs
    return module(x)


def check_compiles(module: torch.nn.Module, x: torch.Tensor) -> None:
    """Eval forward and train forward + backward under ``torch.compile(fullgraph=True)`` equal eager's."""
    torch._dynamo.reset()
    twin = copy.deepcopy(module)  # the same state for both runs (training updates buffers, e.g. EMA's bases)
    compiled = torch.compile(twin, fullgraph=True, backend='aot_eager')
    with torch.no_grad():
        module.eval(), twin.eval()
        torch.testing.assert_close(_call(compiled, x), _call(module, x), rtol=1e-5, atol=1e-5)
    module.train(), twin.train()
    grads = []
    for fn, params in ((module, module), (compiled, twin)):
        xi = x.clone().requires_grad_()
        _call(fn, xi).square().mean().backward()
        grads.append([xi.grad] + [p.grad for p in params.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    for eager, comp in zip(*grads):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize('name', _params('attn'))
def test_block_compiles_without_graph_breaks(name: str) -> None:
    torch.manual_seed(0)
    check_compiles(*_block(name))


@pytest.mark.parametrize('name', _params('mixer'))
def test_mixer_compiles_without_graph_breaks(name: str) -> None:
    torch.manual_seed(0)
    check_compiles(*_mixer(name))


def _model_params(sample: list[str]) -> list:
    return [pytest.param(n, marks=() if n in sample else pytest.mark.slow) for n in visattn.list_models()]


def _model(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    model = timm.create_model(name, num_classes=5)
    size = model.pretrained_cfg['input_size'][1:] if model.pretrained_cfg.get('fixed_input_size') else (64, 64)
    return model, torch.randn(2, 3, *size)


@pytest.mark.parametrize('name', _model_params(MODEL_SAMPLE[:2]))
def test_model_compiles_without_graph_breaks(name: str) -> None:
    torch.manual_seed(0)
    check_compiles(*_model(name))


@pytest.mark.parametrize('name', _model_params(MODEL_SAMPLE))
def test_model_exports(name: str) -> None:
    torch.manual_seed(0)
    model, x = _model(name)
    model.eval()
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)
