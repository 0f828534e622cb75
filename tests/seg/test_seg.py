"""Decode heads, the encoder-decoder, sliding-window inference, the ADE20K dataset and a segmentation run."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import visattn
from visattn.engine import parse_args, run
from visattn.seg import (
    ADE20KDataset,
    AttnHead,
    DAHead,
    EncoderDecoder,
    FCNHead,
    HamHead,
    ISAHead,
    MixedPooling,
    SegTrainTransform,
    SegValTransform,
    SPHead,
    create_head,
    list_heads,
    slide_inference,
)

sys.path.insert(0, str(Path(__file__).parent))
from _ade import make_ade  # noqa: E402


@pytest.fixture(scope='module')
def ade(tmp_path_factory) -> Path:
    return make_ade(tmp_path_factory.mktemp('ade'))


def test_fcn_head_shapes_and_gradients():
    head = FCNHead(12, 5, channels=8, num_convs=2, concat_input=True)
    x = torch.randn(2, 12, 7, 9, requires_grad=True)
    out = head(x)
    assert out.shape == (2, 5, 7, 9)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match='channels'):
        head(torch.randn(2, 11, 7, 9))


def test_attn_head_shares_the_block_across_recurrence():
    one = AttnHead(16, 4, 'se', channels=8, recurrence=1)
    two = AttnHead(16, 4, 'se', channels=8, recurrence=2)
    assert sum(p.numel() for p in one.parameters()) == sum(p.numel() for p in two.parameters())
    two.load_state_dict(one.state_dict())
    one.eval(), two.eval()
    x = torch.randn(2, 16, 5, 6)
    # two passes through the same block: the conv_in output, gated twice
    with torch.no_grad():
        mid = one.convs[0](x)
        expected = one.cls(one.conv_cat(torch.cat([x, one.convs[1](one.attn(one.attn(mid)))], 1)))
        torch.testing.assert_close(two(x), expected)
    with pytest.raises(ValueError, match='recurrence'):
        AttnHead(16, 4, 'se', recurrence=0)
    with pytest.raises(KeyError, match='Unknown attention block'):
        create_head('no_such_head', 16, 4)


@pytest.mark.parametrize('name', [h for h in list_heads() if h != 'fcn'])
def test_named_heads(name):
    try:
        head = create_head(name, 32, 4, channels=16)
    except visattn.UnknownNameError as e:
        pytest.skip(f'a block of the {name} head is not registered in this checkout yet: {e}')
    x = torch.randn(2, 32, 6, 7, requires_grad=True)
    out = head(x)
    assert out.shape == (2, 4, 6, 7)
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all()


def test_da_head_fuses_two_branches_that_start_as_identity():
    if not {'da_position', 'da_channel'} <= set(visattn.list_attn()):
        pytest.skip('the DANet blocks are not registered in this checkout yet')
    head = create_head('da', 24, 3, channels=8).eval()
    assert isinstance(head, DAHead)
    x = torch.randn(2, 24, 5, 7)
    with torch.no_grad():
        # both blocks start as the identity (their scales are 0): the head is then conv -> conv per branch, summed
        plain = head.position[2](head.position[0](x)) + head.channel[2](head.channel[0](x))
        torch.testing.assert_close(head(x), head.cls(plain))
        head.position[1].gamma.fill_(0.5)
        head.channel[1].gamma.fill_(0.5)
        assert not torch.allclose(head(x), head.cls(plain))
    with pytest.raises(ValueError, match='position'):
        create_head('da', 24, 3, attn_kwargs={'rd_ratio': 0.5})


def _hook_calls(module: nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_isa_head_composition():
    """mmseg's ISAHead: 3×3 conv, the issa block, concat [ISA(f), f], 1×1 conv, classifier."""
    head = create_head('issa', 24, 3, channels=8, attn_kwargs={'down_factor': (2, 2)}).eval()
    assert isinstance(head, ISAHead) and isinstance(head.isa, visattn.get_attn('issa'))
    assert head.isa.down_factor == (2, 2) and head.out_conv[0].kernel_size == (1, 1)
    calls = _hook_calls(head.isa)
    x = torch.randn(2, 24, 5, 7, requires_grad=True)
    out = head(x)
    assert out.shape == (2, 3, 5, 7) and calls == [1]
    with torch.no_grad():
        f = head.in_conv(x)
        torch.testing.assert_close(out, head.cls(head.out_conv(torch.cat([head.isa(f), f], 1))))
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in head.isa.parameters())


def test_ham_head_composition():
    """HamNet's single-level head: squeeze 3×3, Hamburger, align 3×3, concat with the input, 3×3, classifier."""
    head = create_head('ham', 24, 3, channels=8, attn_kwargs={'rank': 4, 'rand_init': False}).eval()
    assert isinstance(head, HamHead) and isinstance(head.hamburger, visattn.get_attn('ham'))
    assert head.hamburger.rank == 4 and head.squeeze[0].kernel_size == (3, 3)
    calls = _hook_calls(head.hamburger)
    x = torch.randn(2, 24, 5, 7, requires_grad=True)
    out = head(x)
    assert out.shape == (2, 3, 5, 7) and calls == [1]
    with torch.no_grad():
        mid = head.align(head.hamburger(head.squeeze(x)))
        torch.testing.assert_close(out, head.cls(head.conv_cat(torch.cat([x, mid], 1))))
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and head.hamburger.ham_in.conv.weight.grad is not None
    plain = HamHead(24, 3, channels=8, ham_channels=6, concat_input=False)
    assert plain.conv_cat is None and plain.hamburger.channels == 6 and plain(x).shape == (2, 3, 5, 7)


def test_strip_head_is_spnets():
    """SPNet's head: 1×1 conv to C/2, two mixed pooling modules (pyramid and strip pooling, residual), 3×3 conv to
    C/4, classifier; its mixed pooling module against the released formula written out."""
    head = create_head('strip', 32, 3, channels=16).eval()
    assert isinstance(head, SPHead) and head.trans_layer[0].kernel_size == (1, 1)
    assert head.score_layer[0].out_channels == 8
    calls = [_hook_calls(head.strip_pool1), _hook_calls(head.strip_pool2)]
    x = torch.randn(2, 32, 6, 7, requires_grad=True)
    out = head(x)
    assert out.shape == (2, 3, 6, 7) and calls == [[1], [1]]
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    mpm = MixedPooling(8, (3, 2)).eval()
    t = torch.randn(2, 8, 6, 7)
    with torch.no_grad():
        up = dict(size=(6, 7), mode='bilinear', align_corners=True)
        x1, x2 = mpm.conv1_1(t), mpm.conv1_2(t)
        a = mpm.conv2_0(x1) + torch.nn.functional.interpolate(
            mpm.conv2_1(torch.nn.functional.adaptive_avg_pool2d(x1, 3)), **up) + torch.nn.functional.interpolate(
            mpm.conv2_2(torch.nn.functional.adaptive_avg_pool2d(x1, 2)), **up)
        b = (torch.nn.functional.interpolate(mpm.conv2_3(torch.nn.functional.adaptive_avg_pool2d(x2, (1, None))), **up)
             + torch.nn.functional.interpolate(mpm.conv2_4(torch.nn.functional.adaptive_avg_pool2d(x2, (None, 1))),
                                               **up))
        want = torch.relu(t + mpm.conv3(torch.cat([mpm.conv2_5(torch.relu(a)), mpm.conv2_6(torch.relu(b))], 1)))
        torch.testing.assert_close(mpm(t), want)
    with pytest.raises(ValueError, match='no attention block'):
        create_head('strip', 32, 3, attn_kwargs={'x': 1})
    with pytest.raises(ValueError, match='pool_sizes'):
        MixedPooling(8, (3, 0))


def test_encoder_decoder_output_stride_8_and_odd_sizes():
    model = EncoderDecoder('resnet18', 6, head='fcn', head_channels=16)
    assert model.backbone.feature_info.reduction() == [8, 8]
    x = torch.randn(2, 3, 33, 47)
    out, aux = model(x, with_aux=True)
    assert out.shape == aux.shape == (2, 6, 33, 47)
    (out.mean() + aux.mean()).backward()
    assert all(p.grad is not None for p in model.decode_head.parameters())
    model.eval()
    assert model(x[:1]).shape == (1, 6, 33, 47)
    no_aux = EncoderDecoder('resnet18', 6, head='fcn', head_channels=16, aux_head=False, output_stride=32)
    assert no_aux.backbone.feature_info.reduction() == [16, 32]
    assert no_aux(x, with_aux=True)[1] is None


def test_encoder_decoder_with_an_attention_head_on_an_attention_backbone():
    model = EncoderDecoder('resnet18_cbam', 3, head='gc', head_channels=16)
    assert isinstance(model.decode_head, AttnHead)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_slide_inference_matches_whole_image_for_a_pointwise_model():
    model = nn.Conv2d(3, 4, 1)
    x = torch.randn(2, 3, 13, 10)
    torch.testing.assert_close(slide_inference(model, x, 4, crop=6, stride=4), model(x))
    small = torch.randn(1, 3, 4, 5)  # smaller than a window: padded, then cropped back
    torch.testing.assert_close(slide_inference(model, small, 4, crop=6, stride=4), model(small))


def test_ade20k_dataset_reads_pairs_and_shifts_labels(ade):
    raw = ADE20KDataset(ade, 'training', reduce_zero_label=False, num_classes=4)
    shifted = ADE20KDataset(ade, 'training', num_classes=3)
    img, label = raw[0]
    img2, label2 = shifted[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 24, 32) and label.shape == (24, 32)
    torch.testing.assert_close(img2, img)
    expected = torch.where(label == 0, torch.full_like(label, 255), label - 1)
    assert torch.equal(label2, expected)
    assert set(label2.unique().tolist()) <= {0, 1, 2, 255}
    train = ADE20KDataset(ade, 'training', SegTrainTransform(16, (0.5, 1.5)), num_classes=3)
    img, label = train[1]
    assert img.shape == (3, 16, 16) and img.dtype == torch.float32 and label.shape == (16, 16)
    val = ADE20KDataset(ade, 'validation', SegValTransform(12), num_classes=3)
    img, label = val[0]
    assert img.shape == (3, 12, 16) and label.shape == (24, 32)


def test_ade20k_dataset_errors(ade, tmp_path):
    with pytest.raises(FileNotFoundError, match='is not a directory'):
        ADE20KDataset(tmp_path / 'nowhere')
    with pytest.raises(FileNotFoundError, match='is not a directory'):
        ADE20KDataset(ade, 'test')
    broken = make_ade(tmp_path / 'broken', n_train=2, n_val=1)
    (broken / 'annotations' / 'training' / 'img_1.png').unlink()
    with pytest.raises(FileNotFoundError, match='no annotation'):
        ADE20KDataset(broken, 'training')
    Image.fromarray(np.full((24, 32), 9, np.uint8), mode='L').save(broken / 'annotations' / 'training' / 'img_1.png')
    ds = ADE20KDataset(broken, 'training', num_classes=3)
    with pytest.raises(ValueError, match=r'label values must be in \[0, 3\].*found \[9\]'):
        ds[1]


def test_segmentation_run_trains_and_reports_miou(ade, tmp_path):
    args = ['--task', 'segmentation', '--data-dir', str(ade), '--train-split', 'training', '--val-split',
            'validation', '--model', 'resnet18', '--head', 'fcn', '--head-channels', '16', '--num-classes', '3',
            '--crop-size', '24', '--val-scale', '0', '--iters', '4', '--eval-interval', '2', '--batch-size', '2',
            '--lr', '0.01', '--sched', 'poly', '--decay-rate', '0.9', '--warmup-epochs', '0', '--progress', 'false',
            '--plot', 'true', '--output', str(tmp_path), '--experiment', 'seg']
    metrics = run(parse_args(args))
    run_dir = tmp_path / 'seg'
    with open(run_dir / 'summary.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {'eval_miou', 'eval_acc', 'eval_loss', 'train_loss'} <= set(rows[0])
    assert 0 <= metrics['eval_miou'] <= 100 and 0 <= metrics['eval_acc'] <= 100
    with open(run_dir / 'per_class.csv', newline='') as f:
        assert [r['class'] for r in csv.DictReader(f)] == ['0', '1', '2']
    assert (run_dir / 'summary.png').is_file() and (run_dir / 'best.safetensors').is_file()
    with pytest.raises(ValueError, match='segmentation needs --data-dir'):
        parse_args(['--task', 'segmentation'])
