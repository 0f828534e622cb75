"""``--pretrained`` without the Hugging Face hub: weights already in the local cache load from there without a
network call, and with neither the hub nor a copy the run ends at once with one line that says how to pass a file."""

from __future__ import annotations

import time

import pytest
import timm
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

import visattn  # noqa: F401
from visattn.engine import cli
from visattn.models import _hub as hub

ARGS = ['--model', 'resnet18_se', '--epochs', '1', '--progress', 'false', '--plot', 'false']


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub, and an empty Hugging Face cache of our own."""
    monkeypatch.setattr(hub, 'hub_reachable', lambda timeout=3.0: False)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hf-cache'))
    return tmp_path / 'hf-cache'


def test_no_hub_and_no_copy_is_one_line(offline, tmp_path, capsys):
    start = time.monotonic()
    assert cli([*ARGS, '--pretrained', '--output', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - start < 30
    assert err.count('\n') == 1 and 'timm/resnet18.a1_in1k' in err and 'pretrained_cfg_overlay' in err, err
    assert '--init-from' in err


def test_weights_in_the_local_cache_load_without_the_hub(offline, monkeypatch):
    """A copy of timm's resnet18 weights in the Hugging Face cache layout is what `create_pretrained` loads."""
    repo = offline / 'models--timm--resnet18.a1_in1k'
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text('abc123')
    (repo / 'snapshots' / 'abc123').mkdir(parents=True)
    torch.manual_seed(3)
    src = timm.create_model('resnet18')
    save_file(src.state_dict(), str(repo / 'snapshots' / 'abc123' / 'model.safetensors'))
    assert hub.cached_weights('resnet18') == str(repo / 'snapshots' / 'abc123' / 'model.safetensors')

    def no_network(*a, **k):
        raise AssertionError('the hub was asked although the weights are on this machine')

    monkeypatch.setattr('huggingface_hub.hf_hub_download', no_network)
    model = hub.create_pretrained('resnet18')
    torch.testing.assert_close(model.state_dict()['conv1.weight'], src.state_dict()['conv1.weight'])
    with pytest.raises(hub.HubUnreachableError, match='resnet50'):
        hub.create_pretrained('resnet50')
