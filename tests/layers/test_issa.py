"""Interlaced sparse self-attention against a float64 reference written from the paper: two dense N×N softmax
attentions over the real positions, the first masked to equal offsets inside the P_h × P_w blocks (the long-range
groups), the second to equal blocks (the short-range groups), with mmseg's projections; output, input and every
parameter gradient, at odd sizes (padding, masked keys), 1×1, a map smaller than the blocks, train and eval; the
reach of each step; bf16; scripting and tracing; the mmseg state-dict layout; bad arguments."""

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from timm.layers import create_feature_extractor

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from test_context_blocks import _bn, _conv1x1, _normalize_rows, _randomize, check_against_reference  # noqa: E402


def _cna(x, P, S, prefix, training):
    """conv (no bias) -> BN -> ReLU on x: [B, C, N]."""
    return torch.relu(_bn(_conv1x1(x, P, prefix + '.conv', bias=False), P, S, prefix + '.bn', training))


def _step(x, P, S, prefix, training, mask):
    """One self-attention step over the real positions, x: [B, C, N], mask: [N, N] (True where j is in i's group)."""
    q = _cna(_cna(x, P, S, prefix + '.query_project.0', training), P, S, prefix + '.query_project.1', training)
    k = _cna(_cna(x, P, S, prefix + '.key_project.0', training), P, S, prefix + '.key_project.1', training)
    v = _conv1x1(x, P, prefix + '.value_project')
    scores = (q.transpose(1, 2) @ k) / math.sqrt(q.shape[1])
    attn = _normalize_rows(scores.masked_fill(~mask, float('-inf')), mask)  # [B, N, N]
    return _cna(v @ attn.transpose(1, 2), P, S, prefix + '.output_project', training)


def interlaced_masks(h, w, ph, pw):
    """The two [N, N] masks: positions (r, s) of the padded frame (the padding split as evenly as the block)."""
    top, left = (-h % ph) // 2, (-w % pw) // 2
    r = (torch.arange(h) + top).repeat_interleave(w)
    s = (torch.arange(w) + left).repeat(h)
    long_range = ((r[:, None] % ph) == (r[None] % ph)) & ((s[:, None] % pw) == (s[None] % pw))
    short_range = ((r[:, None] // ph) == (r[None] // ph)) & ((s[:, None] // pw) == (s[None] // pw))
    return long_range, short_range


def ref_issa(x, P, S, training, factor=(8, 8)):
    long_range, short_range = interlaced_masks(*x.shape[2:], *factor)
    y = _step(x.flatten(2), P, S, 'global_relation', training, long_range)
    return _step(y, P, S, 'local_relation', training, short_range).view_as(x)


@pytest.mark.parametrize('shape, factor', [
    ((2, 16, 7, 9), (2, 3)), ((2, 16, 7, 9), (4, 4)), ((1, 16, 13, 17), (4, 4)), ((2, 16, 1, 1), (2, 3)),
    pytest.param((1, 16, 13, 17), (2, 3), marks=pytest.mark.slow),
])
@pytest.mark.parametrize('training', [False, True])
def test_reference(shape, factor, training):
    m = visattn.create_attn('issa', shape[1], down_factor=factor)
    check_against_reference(m, lambda *a: ref_issa(*a, factor=factor), torch.randn(shape), training=training)


def test_reference_divisible_map_and_default_factor():
    """No padding (no mask: the fused path), and the default (8, 8) on a map smaller than one block."""
    m = visattn.create_attn('issa', 8, down_factor=(2, 4), rd_channels=3)
    check_against_reference(m, lambda *a: ref_issa(*a, factor=(2, 4)), torch.randn(2, 8, 6, 8), training=True)
    m = visattn.create_attn('issa', 8)
    check_against_reference(m, ref_issa, torch.randn(2, 8, 5, 7), training=False)


def test_masks_are_the_interlaced_factorisation():
    """Every pair of positions is joined by a long-range then a short-range hop, and each step alone is sparse."""
    long_range, short_range = interlaced_masks(12, 16, 4, 4)
    assert ((long_range.double() @ short_range.double()) > 0).all()
    assert (long_range.sum(1) == 12).all() and (short_range.sum(1) == 16).all()
    # on a padded map the padded positions are not relays: the border pairs whose hop would pass through them are
    # joined only within a block or a group
    long_range, short_range = interlaced_masks(13, 17, 4, 4)
    assert not ((long_range.double() @ short_range.double()) > 0).all()
    assert long_range.sum(1).max() <= math.ceil(13 / 4) * math.ceil(17 / 4) and short_range.sum(1).max() <= 16


def test_reach_of_each_step():
    """Moving one input position moves, after the long-range step, exactly its long-range group (equal offsets in the
    4×4 blocks); after the short-range step, every block that group touches (here all four)."""
    torch.manual_seed(0)
    m = _randomize(visattn.create_attn('issa', 8, down_factor=(4, 4)).double()).eval()
    x = torch.randn(1, 8, 8, 8, dtype=torch.float64)
    x2 = x.clone()
    x2[0, :, 1, 2] += 5.0
    with torch.no_grad():
        moved = (m(x2) - m(x)).abs().amax(1)[0] > 1e-12  # [8, 8]
    # long-range group of (1, 2): rows {1, 5}, cols {2, 6}; its short-range blocks cover all four 4×4 blocks
    assert moved.all()
    with torch.no_grad():
        one = m.global_relation(x, None, 0, 0, 2, 2)
        two = m.global_relation(x2, None, 0, 0, 2, 2)
    moved1 = (two - one).abs().amax(1)[0] > 1e-12
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[1::4, 2::4] = True
    assert torch.equal(moved1, expected)


def test_mmseg_state_dict_layout():
    m = visattn.create_attn('issa', 512)
    keys = set(m.state_dict())
    for step in ('global_relation', 'local_relation'):
        assert {f'{step}.query_project.0.conv.weight', f'{step}.key_project.1.bn.running_var',
                f'{step}.value_project.weight', f'{step}.value_project.bias', f'{step}.output_project.conv.weight',
                f'{step}.output_project.bn.weight'} <= keys
    assert m.key_channels == 256 and m.down_factor == (8, 8)
    assert visattn.create_attn('issa', 16, down_factor=3).down_factor == (3, 3)
    # two steps of (2 conv-BN-ReLU for q and k, value conv, output conv-BN-ReLU); mmseg's ISA module at 512 / 256
    per_step = 2 * (512 * 256 + 2 * 256 + 256 * 256 + 2 * 256) + 512 * 512 + 512 + 512 * 512 + 2 * 512
    assert sum(p.numel() for p in m.parameters()) == 2 * per_step
    meta = visattn.info('issa')
    assert meta.family == 'context' and f'arXiv:{meta.arxiv}' in sys.modules[type(m).__module__].__doc__


def test_bf16_and_meta():
    m32 = _randomize(visattn.create_attn('issa', 32, down_factor=(4, 4))).eval()
    m16 = visattn.create_attn('issa', 32, down_factor=(4, 4), dtype=torch.bfloat16).eval()
    m16.load_state_dict(m32.state_dict())
    x = torch.randn(2, 32, 13, 17)
    with torch.no_grad():
        y32, y16 = m32(x), m16(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
    assert (y16.float() - y32).abs().max() <= 0.05 * y32.abs().max()
    meta = visattn.create_attn('issa', 32, device='meta')
    assert meta(torch.empty(2, 32, 7, 9, device='meta')).shape == (2, 32, 7, 9)


def test_scripts_and_traces():
    m = _randomize(visattn.create_attn('issa', 16, down_factor=(4, 4))).eval()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        scripted = torch.jit.script(m)
    for shape in ((2, 16, 7, 9), (2, 16, 8, 8)):
        x = torch.randn(shape)
        torch.testing.assert_close(scripted(x), m(x))
        traced = create_feature_extractor(torch.nn.Sequential(m).eval(), ['0'])  # the block is a leaf
        torch.testing.assert_close(traced(x)['0'], m(x))


@pytest.mark.parametrize('kwargs, exc, match', [
    (dict(down_factor=0), ValueError, 'down_factor'), (dict(down_factor=(2, 0)), ValueError, 'down_factor'),
    (dict(down_factor=(2, 2, 2)), ValueError, 'down_factor'), (dict(down_factor=2.0), TypeError, 'down_factor'),
    (dict(rd_ratio=0.0), ValueError, 'rd_ratio'), (dict(rd_channels=0), ValueError, 'rd_channels'),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        visattn.create_attn('issa', 16, **kwargs)
    with pytest.raises(ValueError, match='expected 16'):
        visattn.create_attn('issa', 16)(torch.randn(1, 8, 3, 3))
