"""TorchScript over the registry: every mixer outside ``visattn.models.NOT_SCRIPTABLE`` scripts and computes what
eager computes (plain, key-padded and causal calls, where the mixer honours them); every entry of
``NOT_SCRIPTABLE`` names at least one model, and that model really fails to script (the list cannot go stale)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from fnmatch import fnmatch

import pytest
import timm
import torch

import visattn
from visattn.mixers import length_kwargs
from visattn.mixers._sparse_utils import EMPTY_LSE, MASKED, attention_lse
from visattn.models import NOT_SCRIPTABLE

DIM, HEADS, N = 32, 4, 23
PREFIX = 'vit_small_patch16_224_'


def _excluded(mixer: str) -> bool:
    return any(fnmatch(PREFIX + mixer, pattern) for pattern in NOT_SCRIPTABLE)


SCRIPTABLE = [m for m in visattn.list_mixers() if not _excluded(m)]


def _script(module: torch.nn.Module | Callable) -> torch.jit.ScriptModule | torch.jit.ScriptFunction:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit.script is deprecated, not gone: timm still tests it
        return torch.jit.script(module)


def test_most_mixers_script():
    assert len(SCRIPTABLE) >= 18, SCRIPTABLE


@pytest.mark.parametrize('name', SCRIPTABLE)
def test_scripted_mixer_matches_eager(name: str) -> None:
    kw = length_kwargs(name, N)
    torch.manual_seed(0)
    mixer = visattn.create_mixer(name, DIM, num_heads=HEADS, **kw).eval()
    scripted = _script(mixer)
    x = torch.randn(2, N, DIM)
    kpm = torch.rand(2, N) > 0.3
    kpm[:, 0] = True
    calls = [{}]
    if mixer.supports_key_padding or mixer.supports_dense_mask:
        calls.append(dict(attn_mask=kpm))
    if visattn.info(f'mixer:{name}').supports_causal:
        calls.append(dict(is_causal=True))
    with torch.no_grad():
        for call in calls:
            torch.testing.assert_close(scripted(x, **call), mixer(x, **call), rtol=0, atol=1e-5, msg=f'{name} {call}')
        if not (mixer.supports_key_padding or mixer.supports_dense_mask):  # the scripted checks still refuse a mask
            with pytest.raises(torch.jit.Error, match='padding mask'):
                scripted(x, attn_mask=kpm)


@pytest.mark.parametrize('pattern', sorted(NOT_SCRIPTABLE))
def test_not_scriptable_entries_are_true(pattern: str) -> None:
    assert NOT_SCRIPTABLE[pattern].strip(), f'{pattern}: give the reason'
    models = [m for m in visattn.list_models() if fnmatch(m, pattern)]
    assert models, f'NOT_SCRIPTABLE pattern {pattern!r} matches no visattn model'
    for model_name in models:
        with timm.set_scriptable(True):
            model = timm.create_model(model_name, pretrained=False).eval()
        with pytest.raises(Exception):  # noqa: B017 - TorchScript raises frontend, runtime or assertion errors
            _script(model)


def test_scripted_longformer_global_tokens_match_eager() -> None:
    """Negative, repeated and unsorted global positions resolve alike in the scripted loop and in eager."""
    torch.manual_seed(0)
    mixer = visattn.create_mixer('longformer', DIM, num_heads=HEADS, window=5, global_tokens=(7, -1, 0, 22, 7)).eval()
    scripted = _script(mixer)
    assert scripted.global_index(N).tolist() == mixer.global_index(N).tolist() == [0, 7, 22]
    x = torch.randn(2, N, DIM)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), mixer(x), rtol=0, atol=0)
        torch.testing.assert_close(scripted(x, is_causal=True), mixer(x, is_causal=True), rtol=0, atol=0)


def test_scripted_empty_rows_use_the_module_constants() -> None:
    """The scripted helpers spell ``MASKED``/``EMPTY_LSE`` as literals: a row that sees no key must still give
    ``EMPTY_LSE`` and zeros, scripted as in eager."""
    q, k, v = torch.randn(3, 1, 2, 5, 4, dtype=torch.float64).unbind(0)  # float64: the constants exactly
    mask = torch.ones(1, 2, 5, 5, dtype=torch.bool)
    mask[:, 1, 3] = False
    fn = _script(attention_lse)
    for out, lse in (attention_lse(q, k, v, mask, 0.5), fn(q, k, v, mask, 0.5)):
        assert lse[0, 1, 3].item() == EMPTY_LSE and lse[0, 0].gt(MASKED / 2).all()
        assert out[0, 1, 3].abs().max().item() == 0.


def test_scripted_bigbird_sparse_blocks_match_eager() -> None:
    """Small blocks, so that the scripted window, global and random pieces all run (the registry test's default
    blocks of 64 make every block global at N = 23), with padded keys and a last block that sees none."""
    torch.manual_seed(0)
    mixer = visattn.create_mixer('bigbird', DIM, num_heads=HEADS, block_size=4, num_random_blocks=2, seed=3).eval()
    scripted = _script(mixer)
    x = torch.randn(2, N, DIM)
    kpm = torch.rand(2, N) > 0.3
    kpm[:, :4] = True
    kpm[1, 8:] = False
    key_blocks, valid, glob = scripted.block_layout(6)
    for got, want in zip((key_blocks, valid, glob), mixer.block_layout(6)):
        assert torch.equal(got, want)
    with torch.no_grad():
        for call in ({}, dict(attn_mask=kpm)):
            torch.testing.assert_close(scripted(x, **call), mixer(x, **call), rtol=0, atol=1e-6)
