"""The ``visattn`` command.

    visattn list [--kind K] [--family F] [--markdown]   the registered blocks, mixers, feed-forward layers, models
    visattn info NAME                                   a block's or mixer's paper and properties
    visattn train [-c RECIPE] [options]                 train.py: fine-tune on ImageNet, ADE20K or the demo data
    visattn train --list-configs                        the shipped recipes
    visattn bench NAME [--shape ..] [--backward] [--json]  time and peak memory beside full attention / timm
    visattn viz pattern NAME | map MODEL --image F | gallery   where each attention looks, as PNGs
    visattn zoo --write models/ | --check models/       the model cards and the zoo table, generated
"""

from __future__ import annotations

import argparse
import sys

from . import registry


def _model_params(name: str) -> int:
    import timm

    model = timm.create_model(name, device='meta')
    return sum(p.numel() for p in model.parameters())


def markdown_tables() -> str:
    """The README tables of every registered block, mixer and model, generated from the registry."""
    lines = ['| name | kind | family | complexity | paper | arXiv | year | backends |',
             '|---|---|---|---|---|---|---|---|']
    kinds = (('attn', registry.list_attn()), ('mixer', registry.list_mixers()), ('ffn', registry.list_ffns()))
    for kind, names in kinds:
        for name in names:
            i = registry.info(f'{kind}:{name}')
            what = {'attn': '2-D block', 'mixer': 'token mixer', 'ffn': 'feed-forward'}[kind]
            what += ', causal' if i.supports_causal else ''
            what += ', grid' if i.requires_grid else ''
            lines.append(
                f'| `{name}` | {what} | {i.family} | '
                f'{i.complexity} | {i.paper} | [{i.arxiv or "paper"}]({i.url}) | {i.year} | {", ".join(i.backends)} |')
    lines += ['', '| timm model | parameters |', '|---|---:|']
    lines += [f'| `{name}` | {_model_params(name):,} |' for name in registry.list_models()]
    return '\n'.join(lines)


def _format_info(i: registry.AttnInfo) -> str:
    fields = [
        ('name', i.name), ('kind', i.kind), ('class', i.cls_name), ('paper', i.paper),
        ('arXiv', f'{i.arxiv} ({i.url})' if i.arxiv else f'none ({i.url})'), ('year', i.year),
        ('family', i.family), ('complexity', i.complexity),
        ('backends', ', '.join(i.backends)),
    ]
    if i.kind == 'mixer':
        fields += [('supports_causal', i.supports_causal), ('requires_seq_len', i.requires_seq_len),
                   ('requires_grid', i.requires_grid)]
    return '\n'.join(f'{k:>16}: {v}' for k, v in fields)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ['train']:  # train.py's own parser takes the rest of the line
        import visattn  # noqa: F401  (registers the models with timm)

        from .engine import cli

        return cli(argv[1:], prog='visattn train')
    if argv[:1] == ['bench']:
        import visattn  # noqa: F401

        from .bench import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ['viz']:
        import visattn  # noqa: F401

        from .viz import main as viz_main

        return viz_main(argv[1:])
    if argv[:1] == ['zoo']:
        import visattn  # noqa: F401

        from .zoo import main as zoo_main

        return zoo_main(argv[1:])
    parser = argparse.ArgumentParser(prog='visattn', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='cmd', required=True)
    p_list = sub.add_parser('list', help='list blocks, mixers or models')
    p_list.add_argument('--kind', choices=('attn', 'mixer', 'ffn', 'model', 'all'), default='all')
    p_list.add_argument('--family', default=None, help='only this family (blocks and mixers)')
    p_list.add_argument('--markdown', action='store_true', help="print the README's tables")
    p_info = sub.add_parser('info', help="a block's or mixer's paper and properties")
    p_info.add_argument('name')
    sub.add_parser('train', help='train.py as a command (visattn train --help)', add_help=False)
    sub.add_parser('bench', help='time and memory of a block or mixer (visattn bench --help)', add_help=False)
    sub.add_parser('viz', help='pictures of where each attention looks (visattn viz --help)', add_help=False)
    sub.add_parser('zoo', help='the model cards in models/ (visattn zoo --help)', add_help=False)
    args = parser.parse_args(argv)

    import visattn  # noqa: F401  (registers everything)

    try:
        if args.cmd == 'info':
            print(_format_info(registry.info(args.name)))
        elif args.markdown:
            print(markdown_tables())
        else:
            if args.kind in ('attn', 'all'):
                print('\n'.join(f'attn   {n}' for n in registry.list_attn(args.family)))
            mixer_family = args.family is None or args.family in registry.list_families('mixer')
            if args.kind in ('mixer', 'all') and mixer_family:
                print('\n'.join(f'mixer  {n}' for n in registry.list_mixers(family=args.family)))
            ffn_family = args.family is None or args.family in registry.list_families('ffn')
            if args.kind in ('ffn', 'all') and ffn_family:
                print('\n'.join(f'ffn    {n}' for n in registry.list_ffns(args.family)))
            if args.kind in ('model', 'all') and args.family is None:
                print('\n'.join(f'model  {n}' for n in registry.list_models()))
    except (KeyError, ValueError) as e:
        print(f'visattn: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
