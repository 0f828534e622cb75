"""The pieces of the engine: samplers, the digits, checkpoints and --init-from."""

from __future__ import annotations

import pytest
import timm
import torch

import visattn  # noqa: F401
from visattn.data import DigitsDataset, EpochSampler, ShardSampler, load_digits
from visattn.engine import CheckpointError, init_from, read_weights, save_weights
from visattn.engine.models import adapt_small_input_stem


def test_epoch_sampler_shards_cover_the_data_and_depend_only_on_seed_and_epoch():
    shards = [EpochSampler(10, rank=r, world_size=3, seed=5) for r in range(3)]
    for s in shards:
        s.set_epoch(2)
    drawn = [list(s) for s in shards]
    assert all(len(d) == 4 for d in drawn)  # ceil(10 / 3), padded by repeats as DistributedSampler
    assert set(sum(drawn, [])) == set(range(10))
    again = EpochSampler(10, rank=1, world_size=3, seed=5)
    again.set_epoch(2)
    assert list(again) == drawn[1]
    again.set_epoch(3)
    assert list(again) != drawn[1]
    long = EpochSampler(4, num_samples=10, seed=0)  # iteration-based: more samples than data
    assert len(list(long)) == 10 and set(long) == set(range(4))
    with pytest.raises(ValueError, match='rank'):
        EpochSampler(4, rank=2, world_size=2)


def test_shard_sampler_is_an_exact_partition():
    parts = [list(ShardSampler(11, rank=r, world_size=4)) for r in range(4)]
    assert sorted(sum(parts, [])) == list(range(11))


def test_digits_split_is_stratified_disjoint_and_normalised():
    images, labels = load_digits()
    assert images.shape == (1797, 1, 8, 8) and labels.shape == (1797,)
    assert images.min() == 0 and images.max() == 1 and set(labels.tolist()) == set(range(10))
    train, val = DigitsDataset('train'), DigitsDataset('val')
    assert len(train) + len(val) == 1797
    for c in range(10):
        n_val, n_all = (val.labels == c).sum().item(), (labels == c).sum().item()
        assert n_val == round(0.2 * n_all)
    assert abs(train.images.mean().item()) < 1e-5 and train.images.std().item() == pytest.approx(1, abs=1e-4)
    flat = {tuple(x.flatten().tolist()) + (int(y),) for x, y in zip(train.images, train.labels)}
    assert sum(tuple(x.flatten().tolist()) + (int(y),) in flat for x, y in zip(val.images, val.labels)) < 5
    with pytest.raises(ValueError, match='split'):
        DigitsDataset('test')


def test_init_from_loads_a_plain_resnet_into_an_attention_resnet(tmp_path):
    plain = timm.create_model('resnet18', num_classes=1000)
    path = tmp_path / 'resnet18.pth'
    torch.save({'state_dict': plain.state_dict()}, path)
    model = timm.create_model('resnet18_cbam', num_classes=10)
    fresh_attn = {k: v.clone() for k, v in model.state_dict().items() if '.se.' in k}
    report = init_from(model, path)
    state = model.state_dict()
    for k, v in plain.state_dict().items():
        if k.startswith('fc.'):
            assert any(m.startswith(f'{k} ') for m in report['mismatched']), k
        else:
            assert torch.equal(state[k], v), k
    assert set(report['missing']) == set(fresh_attn) | {'fc.weight', 'fc.bias'}
    assert all(torch.equal(state[k], v) for k, v in fresh_attn.items())  # attention keeps its own init
    # a first conv with another number of input channels is adapted (summed over RGB for one channel)
    gray = timm.create_model('resnet18_cbam', num_classes=10, in_chans=1)
    init_from(gray, path)
    torch.testing.assert_close(gray.conv1.weight, plain.conv1.weight.sum(1, keepdim=True))


def test_weights_round_trip_and_corrupt_files(tmp_path):
    model = adapt_small_input_stem(timm.create_model('resnet18_se', num_classes=4, in_chans=1))
    save_weights(model, tmp_path / 'w.safetensors', metadata={'epoch': '3'})
    loaded = read_weights(tmp_path / 'w.safetensors')
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    assert not list(tmp_path.glob('*.tmp'))  # the temporary file was renamed
    (tmp_path / 'bad.safetensors').write_bytes(b'\x00' * 20)
    with pytest.raises(CheckpointError, match='corrupt'):
        read_weights(tmp_path / 'bad.safetensors')
    torch.save([1, 2, 3], tmp_path / 'list.pth')
    with pytest.raises(CheckpointError, match='state dict'):
        read_weights(tmp_path / 'list.pth')
    with pytest.raises(CheckpointError, match='not found'):
        read_weights(tmp_path / 'none.pth')
    with pytest.raises(ValueError, match='conv1'):
        adapt_small_input_stem(torch.nn.Linear(2, 2))


def test_pretrained_weights_come_from_the_timm_base_model():
    from visattn.engine.models import load_pretrained, timm_base_name

    assert timm_base_name('resnet50_cbam') == 'resnet50'
    assert timm_base_name('resnet18_se') == 'resnet18'
    assert timm_base_name('vit_small_patch16_224_aft_full') == 'vit_small_patch16_224'  # a mixer name with '_'
    assert timm_base_name('sknet50') is None  # no timm model underneath
    assert timm_base_name('resnet50') is None  # a timm model loads its own weights
    with pytest.raises(ValueError, match='no published weights'):
        load_pretrained(torch.nn.Linear(1, 1), 'sknet50')
