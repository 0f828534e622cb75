"""The registry: names, metadata, errors, and the `visattn` command."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.nn as nn

import visattn
from visattn import cli, registry

GATING = {'se': 'channel', 'eca': 'channel', 'cbam': 'spatial', 'bam': 'spatial', 'sk': 'channel', 'gc': 'context'}


def test_blocks_registered_with_metadata():
    assert set(GATING) <= set(visattn.list_attn())
    for name, family in GATING.items():
        i = visattn.info(name)
        assert i.name == name and i.family == family and i.kind == 'attn'
        assert re.fullmatch(r'\d{4}\.\d{4,5}', i.arxiv) and 2010 < i.year < 2030 and i.paper
        assert i.complexity.startswith('O(') and 'torch' in i.backends
        assert visattn.get_attn(name).attn_info.name == name
        assert name in visattn.list_attn(family)
    assert visattn.info('attn:se') == visattn.info('se')


def test_create_attn_and_classes():
    m = visattn.create_attn('cbam', 64, rd_ratio=1 / 8)
    assert isinstance(m, visattn.get_attn('cbam')) and m.channel.rd_channels == 8
    assert visattn.get_attn(visattn.get_attn('se')) is visattn.get_attn('se')
    assert visattn.get_attn('SE') is visattn.get_attn('se')


def test_unknown_names_list_close_matches():
    with pytest.raises(KeyError) as e:
        visattn.get_attn('cbma')
    msg = str(e.value)
    assert "Did you mean 'cbam'" in msg and 'Known:' in msg
    assert all(name in msg.split('Known:')[1] for name in visattn.list_attn())
    with pytest.raises(ValueError, match='Did you mean'):
        visattn.info('cbm')
    with pytest.raises(ValueError, match='Unknown family'):
        visattn.list_attn('nope')
    with pytest.raises(KeyError, match='token mixer'):
        visattn.get_mixer('no_such_mixer')
    with pytest.raises(ValueError, match='Unknown kind'):
        visattn.info('foo:se')
    with pytest.raises(TypeError, match='name must be a str'):
        visattn.get_attn(3)


def test_register_refuses_duplicates_and_bad_kind():
    with pytest.raises(ValueError, match='already registered'):
        registry.register('se', paper='x', arxiv='0000.00000', year=2020, family='channel', complexity='O(N)')(
            type('Dup', (nn.Module,), {}))
    with pytest.raises(ValueError, match='kind'):
        registry.register('x', paper='x', arxiv='0', year=2020, family='f', complexity='O(N)', kind='block')


def test_cli_list_and_info(capsys):
    assert cli.main(['list', '--kind', 'attn', '--family', 'channel']) == 0
    out = capsys.readouterr().out.split()
    assert {'se', 'eca', 'sk'} <= set(out) and 'cbam' not in out
    assert cli.main(['info', 'cbam']) == 0
    assert '1807.06521' in capsys.readouterr().out
    assert cli.main(['info', 'cbma']) == 2
    assert "Did you mean 'cbam'" in capsys.readouterr().err
    assert cli.main(['list', '--kind', 'model']) == 0
    assert 'resnet50_cbam' in capsys.readouterr().out


def test_cli_entry_point_runs():
    out = subprocess.run([sys.executable, '-m', 'visattn.cli', 'info', 'se'], capture_output=True, text=True,
                         check=True).stdout
    assert 'Squeeze-and-Excitation Networks' in out


def test_readme_tables_are_generated_from_the_registry():
    readme = (Path(__file__).parents[1] / 'README.md').read_text()
    start, end = '<!-- registry:start -->', '<!-- registry:end -->'
    assert start in readme and end in readme, 'README lacks the generated registry tables'
    table = readme.split(start)[1].split(end)[0].strip()
    assert table == cli.markdown_tables().strip(), 'README tables are stale: run `visattn list --markdown`'


def test_every_entry_links_its_paper():
    """An arXiv id of the form yymm.nnnnn, or (a paper without one) a published address."""
    import re

    for kind, names in (('attn', visattn.list_attn()), ('mixer', visattn.list_mixers())):
        for name in names:
            i = visattn.info(f'{kind}:{name}')
            assert re.fullmatch(r'\d{4}\.\d{4,5}', i.arxiv) or (not i.arxiv and i.paper_url.startswith('https://'))
            assert i.url.startswith('https://') and i.url.rstrip('/').split('/')[-1], name
    for name in visattn.list_attn():  # a registered subclass of a registered block carries its own entry
        own = visattn.get_attn(name).attn_info
        assert visattn.get_attn(own.name) is visattn.get_attn(name), name
    with pytest.raises(ValueError, match='paper_url'):
        visattn.register('x_nowhere', paper='p', arxiv='', year=2020, family='channel', complexity='O(N)')
