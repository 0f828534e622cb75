"""``visattn viz``: the measured patterns match the mechanisms' definitions, the README's gallery is current, and
the commands write PNGs (pattern, map on an image) or fail in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

import visattn  # noqa: F401
from visattn import viz
from visattn.cli import main

ROOT = Path(__file__).resolve().parents[1]
PNG = b'\x89PNG\r\n\x1a\n'


def test_local_pattern_is_its_window_and_causal_cuts_the_future():
    i, j = torch.meshgrid(torch.arange(40), torch.arange(40), indexing='ij')
    p = viz.pattern('local', n=40, window=7)
    assert torch.equal(p.mask, (i - j).abs() <= 3)
    p = viz.pattern('local', n=40, window=7, causal=True)  # causal: the 7 keys up to the query
    assert torch.equal(p.mask, (i - j >= 0) & (i - j <= 6))


def test_neighbourhood_pattern_is_the_dilated_window():
    p = viz.pattern('attn:na', size=11, query=(5, 5), kernel_size=3, dilation=2, num_heads=1)
    want = torch.zeros(11, 11, dtype=torch.bool)
    want[3:8:2, 3:8:2] = True
    assert torch.equal(p.mask, want)
    p = viz.pattern('attn:window', size=8, query=(5, 2), window_size=4, shift_size=0, num_heads=1)
    want = torch.zeros(8, 8, dtype=torch.bool)
    want[4:8, 0:4] = True
    assert torch.equal(p.mask, want)
    assert viz.mask_text(p).splitlines()[5] == '##Q#....'


def test_readme_gallery_is_current():
    """docs/patterns.txt holds the gallery's masks; regenerate with `visattn viz gallery --out-dir docs`."""
    text = (ROOT / 'docs' / 'patterns.txt').read_text()
    assert viz.gallery_text(viz.gallery_patterns()) == text, 'stale: run `visattn viz gallery --out-dir docs`'
    assert (ROOT / 'docs' / 'patterns.png').read_bytes()[:8] == PNG
    assert '(docs/patterns.png)' in (ROOT / 'README.md').read_text()


def test_gate_maps_measure_channel_and_spatial_gates():
    """SE gates channels only, CBAM (its fused residual tail included) channels and positions; the factors are a
    sigmoid's. (``zero_init_last=False``: timm's zero-initialised last norm would hand the gates zero maps.)"""
    image = torch.randn(1, 3, 64, 64)
    se = viz.gate_maps(timm.create_model('resnet18_se', zero_init_last=False), image)
    assert len(se) == 8 and all(g['varies'] == 'channel' for g in se)
    assert all(((g['channel'] > 0) & (g['channel'] < 1)).all() for g in se)
    cbam = viz.gate_maps(timm.create_model('resnet18_cbam', zero_init_last=False), image)
    assert len(cbam) == 8 and all(g['varies'] == 'both' for g in cbam)
    assert all(((g['spatial'] > 0) & (g['spatial'] < 1)).all() for g in cbam)


def test_commands_write_pngs(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / 'p.png'
    assert main(['viz', 'pattern', 'longformer', '--n', '24', '--set', 'window=5', '--set', 'global_tokens=[0]',
                 '--out', str(out), '--text']) == 0
    assert out.read_bytes()[:8] == PNG
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == '#' * 24 and lines[5] == '#..' + '#' * 5 + '.' * 16
    Image.fromarray((torch.rand(48, 40, 3) * 255).byte().numpy()).save(tmp_path / 'photo.jpg')
    for model in ('resnet18_cbam', 'vit_small_patch16_224_local'):
        out = tmp_path / f'{model}.png'
        assert main(['viz', 'map', model, '--image', str(tmp_path / 'photo.jpg'), '--out', str(out)]) == 0
        assert out.read_bytes()[:8] == PNG


@pytest.mark.parametrize('argv, match', [
    (['pattern', 'nope'], 'Unknown'),
    (['pattern', 'se', '--causal'], 'causal'),
    (['pattern', 'attn:na', '--query', '99,0'], 'query'),
    (['map', 'resnet18_se', '--image', 'missing.jpg'], '--image'),
])
def test_errors_are_one_line(capsys, argv, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(['viz', *argv]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and match in err, err
