"""``visattn viz``: pictures of where each attention looks, measured from the mechanism itself.

``pattern``: which keys each query sees. The picture is measured, not drawn: for a token mixer, the input
``x`` [1, N, C] (float64) goes through the mixer and, for every query i, the gradient of output token i with
respect to the whole input gives ``|∂y_i / ∂x_j|`` summed over channels; key j is seen by query i where that is not
zero (tokens mix only through the attention; ``qkv`` and ``proj`` act on channels). For a 2-D block the same is
taken for one query pixel over the H×W map. Weights are shown per query, scaled to its strongest key.

``map``: a model's attention on an image, also measured: each visattn gate's ``output / input`` (a channel gate
gives one factor per channel, drawn as bars; a spatial gate a map per stage, averaged over channels and drawn over
the image); for a ViT, the gradient map of one patch's mixer output over the tokens of that block's input.

``gallery``: the patterns of the sparse, hashing, sorting, clustering, local and axial mechanisms in one PNG,
beside a text file of the same masks (``#`` seen, ``.`` not) that the test suite regenerates and compares.

Drawn with matplotlib (``pip install "visattn[viz]"``), headless (the Agg backend).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import registry
from .mixers import length_kwargs

__all__ = ['GALLERY', 'Pattern', 'attention_map', 'gallery', 'gate_maps', 'main', 'mask_text', 'pattern']

DIM = 16


@dataclass
class Pattern:
    """A measured pattern: ``weights`` [N, N] (a mixer: query rows, key columns) or [H, W] (a block: the map of
    one query pixel), each row (or the map) scaled to its maximum; ``mask`` is ``weights > 0``."""

    name: str
    kind: str
    weights: torch.Tensor
    query: tuple[int, int] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def mask(self) -> torch.Tensor:
        return self.weights > 1e-9


# the gallery: (kind, name, constructor arguments, what the picture shows)
GALLERY: list[tuple[str, str, dict[str, Any], str]] = [
    ('mixer', 'local', dict(window=9), 'local, window 9'),
    ('mixer', 'longformer', dict(window=9, global_tokens=(0, 40)), 'longformer, window 9, global 0 and 40'),
    ('mixer', 'bigbird', dict(block_size=8, num_window_blocks=3, num_global_blocks=1, num_random_blocks=1, seed=0),
     'bigbird, blocks of 8'),
    ('mixer', 'sparse_strided', dict(stride=8), 'sparse strided, stride 8'),
    ('mixer', 'sparse_fixed', dict(stride=8, summary=2), 'sparse fixed, stride 8'),
    ('mixer', 'reformer', dict(bucket_size=8, n_hashes=1, seed=0), 'reformer buckets of 8, one hash'),
    ('mixer', 'sinkhorn', dict(bucket_size=8), 'sinkhorn, buckets of 8'),
    ('mixer', 'routing', dict(num_clusters=4), 'routing, 4 clusters'),
    ('attn', 'na', dict(kernel_size=5, dilation=2, num_heads=1), 'na, kernel 5, dilation 2'),
    ('attn', 'window', dict(window_size=4, shift_size=2, num_heads=1), 'window 4, shifted by 2'),
    ('attn', 'cc', dict(recurrence=1), 'criss-cross, one pass'),
    ('attn', 'sasa', dict(kernel_size=5, num_heads=1), 'sasa, kernel 5'),
    ('attn', 'halo', dict(block_size=4, halo_size=1, num_heads=1), 'halo, block 4, halo 1'),
    ('attn', 'axial', dict(num_heads=1), 'axial: height, then width'),
]


def _wake(module: nn.Module) -> nn.Module:
    """Parameters that start at zero (the residual scales of CCNet, DANet, ...) set to one, so that the attention
    path, which they switch off at initialisation, shows."""
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() and not p.any():
                p.fill_(1.)
    return module


def _check_kind(name: str) -> tuple[str, str]:
    kind, _, short = name.rpartition(':')
    if kind:
        registry.info(name)
        return kind, short
    return registry.info(name).kind, name


def pattern(name: str, *, n: int = 64, size: int | tuple[int, int] = 16, query: tuple[int, int] | None = None,
            causal: bool = False, seed: int = 0, **kwargs: Any) -> Pattern:
    """Measure the pattern of the mixer or block ``name`` (see the module docstring).

    Args:
        name: a mixer or block (``'mixer:<name>'`` / ``'attn:<name>'`` where both kinds have the name).
        n: tokens of a mixer's input.
        size: H×W of a block's input (an int for a square).
        query: the query pixel of a block (default: the centre, rounded up).
        causal: call the mixer with ``is_causal=True``.
        seed: seeds the input and the module's random parts.
        **kwargs: constructor arguments of the mechanism.
    """
    kind, short = _check_kind(name)
    torch.manual_seed(seed)
    if kind == 'mixer':
        heads = kwargs.pop('num_heads', 1)
        module = registry.create_mixer(short, DIM, num_heads=heads, dtype=torch.float64,
                                       **{**length_kwargs(short, n), **kwargs}).eval()
        _wake(module)
        x0 = torch.randn(1, n, DIM, dtype=torch.float64)

        def rows(batched: bool, which: list[int]) -> torch.Tensor:
            """|∂y_i/∂x_j| for the rows ``which``: one backward pass over a batch of copies of the input (copy i
            carries the gradient of its token i), or one sequence and one backward pass per row."""
            x = (x0.expand(len(which), n, DIM) if batched else x0).clone().requires_grad_(True)
            torch.manual_seed(seed)
            out = module(x, is_causal=True) if causal else module(x)
            if batched:
                (g,) = torch.autograd.grad(out[torch.arange(len(which)), torch.tensor(which)].sum(), x)
                return g.abs().sum(-1)
            return torch.stack([torch.autograd.grad(out[0, i].sum(), x, retain_graph=True)[0][0].abs().sum(-1)
                                for i in which])

        w = rows(True, list(range(n)))
        probe = sorted({0, n // 2, n - 1})
        if not torch.allclose(w[probe], rows(False, probe), rtol=1e-9, atol=1e-12):
            w = rows(False, list(range(n)))  # the mixer draws its random parts per sequence: one row at a time
        w = w / w.amax(-1, keepdim=True).clamp_min(1e-300)
        return Pattern(short, kind, w.detach(), None, kwargs)
    if kind != 'attn':
        raise ValueError(f'{name!r} is a {kind}; viz pattern draws mixers and 2-D blocks')
    if causal:
        raise ValueError('causal applies to token mixers only')
    H, W = (size, size) if isinstance(size, int) else size
    qi, qj = query if query is not None else (H // 2, W // 2)
    if not (0 <= qi < H and 0 <= qj < W):
        raise ValueError(f'query must lie inside the {H}x{W} map, got {(qi, qj)}')
    module = _wake(registry.create_attn(short, DIM, dtype=torch.float64, **kwargs).eval())
    x = torch.randn(1, DIM, H, W, dtype=torch.float64, requires_grad=True)
    out = module(x)
    if out.shape[-2:] != (H, W):
        raise ValueError(f'{short} changes the map size ({H}x{W} -> {tuple(out.shape[-2:])}); draw it with stride 1')
    (g,) = torch.autograd.grad(out[0, :, qi, qj].sum(), x)
    w = g[0].abs().sum(0)
    return Pattern(short, kind, (w / w.max().clamp_min(1e-300)).detach(), (qi, qj), kwargs)


def mask_text(p: Pattern) -> str:
    """The mask as text: one line per query (mixer) or map row (block), ``#`` seen, ``.`` not, ``Q`` the query."""
    m = p.mask
    lines = [''.join('#' if v else '.' for v in row.tolist()) for row in m]
    if p.query is not None:
        qi, qj = p.query
        lines[qi] = lines[qi][:qj] + 'Q' + lines[qi][qj + 1:]
    return '\n'.join(lines)


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise ImportError('visattn viz draws with matplotlib: pip install "visattn[viz]" (or matplotlib)') from None
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    return plt


def _draw(ax, p: Pattern, title: str) -> None:
    # every seen key at least dim, brighter with its weight (square root: weak influence stays visible)
    img = torch.where(p.mask, 0.2 + 0.8 * p.weights.sqrt(), torch.zeros_like(p.weights)).numpy()
    ax.imshow(img, cmap='magma', vmin=0, vmax=1, interpolation='nearest')
    if p.query is not None:
        ax.plot([p.query[1]], [p.query[0]], marker='s', markersize=4, markerfacecolor='none', markeredgecolor='cyan')
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel('key' if p.kind == 'mixer' else 'W', fontsize=7)
    ax.set_ylabel('query' if p.kind == 'mixer' else 'H', fontsize=7)


def draw_pattern(p: Pattern, out: str | Path, title: str | None = None) -> Path:
    """Write the pattern ``p`` as a PNG."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 4), dpi=120)
    _draw(ax, p, title or p.name)
    out = Path(out)
    fig.savefig(out, bbox_inches='tight')
    plt.close(fig)
    return out


def gallery_patterns() -> list[tuple[Pattern, str]]:
    """The measured patterns of `GALLERY`, with their titles."""
    return [(pattern(f'{kind}:{name}', **dict(kw)), title) for kind, name, kw, title in GALLERY]


def gallery_text(patterns: list[tuple[Pattern, str]]) -> str:
    return '\n\n'.join(f'## {title}\n{mask_text(p)}' for p, title in patterns) + '\n'


def gallery(out_dir: str | Path = 'docs') -> tuple[Path, Path]:
    """Write ``patterns.png`` and ``patterns.txt`` (the masks as text) into ``out_dir``."""
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pats = gallery_patterns()
    cols = 4
    rows = (len(pats) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), dpi=100)
    for ax in axes.flat[len(pats):]:
        ax.axis('off')
    for ax, (p, title) in zip(axes.flat, pats):
        _draw(ax, p, title)
    fig.suptitle('Which keys each query sees (mixers: 64 tokens; blocks: one query pixel of a 16x16 map), '
                 'measured by autograd', fontsize=10)
    fig.tight_layout()
    png = out_dir / 'patterns.png'
    fig.savefig(png, metadata={'Software': None})
    plt.close(fig)
    txt = out_dir / 'patterns.txt'
    txt.write_text(gallery_text(pats))
    return png, txt


def _visattn_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    classes = tuple({cls for kind in ('attn',) for cls, _ in registry._ENTRIES[kind].values()})
    return [(n, m) for n, m in model.named_modules() if isinstance(m, classes) and n]


def gate_maps(model: nn.Module, image: torch.Tensor, eps: float = 1e-6) -> list[dict[str, Any]]:
    """Each visattn block's gate on ``image`` [1, 3, H, W]: the block's input is captured during the model's
    forward (also where a fused block calls its ``forward_add``), then the gate is measured as ``block(x) / x``
    where ``|x| > eps``: ``{'name', 'channel': [C] mean factor per channel, 'spatial': [h, w] mean factor per
    position, 'varies': 'channel' | 'spatial' | 'both'}``."""
    blocks = dict(_visattn_blocks(model))
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in blocks.items():
        hooks.append(m.register_forward_pre_hook(
            lambda mod, args, name=name: captured.setdefault(name, args[0].detach())))
        if hasattr(m, 'forward_add'):  # the fused residual tail of visattn's ResNets calls it instead of forward
            def wrapped(x, shortcut, name=name, orig=m.forward_add):
                captured.setdefault(name, x.detach())
                return orig(x, shortcut)
            m.forward_add = wrapped
    model.eval()
    try:
        with torch.no_grad():
            model(image)
    finally:
        for h in hooks:
            h.remove()
        for m in blocks.values():
            m.__dict__.pop('forward_add', None)
    found: list[dict[str, Any]] = []
    with torch.no_grad():
        for name, x in captured.items():
            out = blocks[name](x)
            if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                continue  # a block that changes the shape (a strided one) has no gate to read
            keep = x.abs() > eps
            ratio = torch.where(keep, out / torch.where(keep, x, torch.ones_like(x)), torch.zeros_like(x))[0]
            count = keep[0].to(ratio.dtype)
            channel = ratio.sum((1, 2)) / count.sum((1, 2)).clamp_min(1)
            spatial = ratio.sum(0) / count.sum(0).clamp_min(1)
            spread_c = float(channel.std()) if channel.numel() > 1 else 0.
            spread_s = float(spatial.std()) if spatial.numel() > 1 else 0.
            varies = 'both' if min(spread_c, spread_s) > 1e-4 else ('channel' if spread_c >= spread_s else 'spatial')
            found.append(dict(name=name, channel=channel, spatial=spatial, varies=varies))
    return found


def attention_map(model: nn.Module, image: torch.Tensor, patch: tuple[int, int] | None = None,
                  block: int = -1) -> torch.Tensor:
    """For a timm ViT: the gradient magnitude of one patch token's mixer output (block ``block``) over the tokens
    of that block's mixer input, on the patch grid [gh, gw], scaled to its maximum."""
    blocks = getattr(model, 'blocks', None)
    if blocks is None:
        raise ValueError(f'{type(model).__name__} is not a ViT (no .blocks)')
    attn = blocks[block].attn
    gh, gw = model.patch_embed.dynamic_feat_size(tuple(image.shape[-2:])) if hasattr(
        model.patch_embed, 'dynamic_feat_size') else model.patch_embed.grid_size
    pi, pj = patch if patch is not None else (gh // 2, gw // 2)
    if not (0 <= pi < gh and 0 <= pj < gw):
        raise ValueError(f'patch must lie inside the {gh}x{gw} patch grid, got {(pi, pj)}')
    prefix = getattr(model, 'num_prefix_tokens', 0)
    seen: dict[str, torch.Tensor] = {}

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        x = args[0].detach().requires_grad_(True)
        seen['x'] = x
        return (x, *args[1:]), kwargs

    def post(module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        seen['y'] = out

    h1 = attn.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = attn.register_forward_hook(post, with_kwargs=True)
    try:
        model.eval()(image)
    finally:
        h1.remove()
        h2.remove()
    q = prefix + pi * gw + pj
    (g,) = torch.autograd.grad(seen['y'][0, q].sum(), seen['x'])
    w = g[0, prefix:].abs().sum(-1).reshape(gh, gw)
    return (w / w.max().clamp_min(1e-30)).detach()


def _load_image(path: str | Path, size: tuple[int, int], mean: tuple, std: tuple) -> tuple[torch.Tensor, Any]:
    from PIL import Image

    try:
        img = Image.open(path).convert('RGB').resize((size[1], size[0]))
    except (OSError, ValueError) as e:
        raise ValueError(f'--image {path}: cannot read the image ({e})') from None
    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(size[0], size[1], 3)
    t = t.permute(2, 0, 1).float() / 255
    t = (t - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return t[None], img


def draw_map(model_name: str, image_path: str | Path, out: str | Path, checkpoint: str | None = None,
             patch: tuple[int, int] | None = None, num_classes: int | None = None) -> Path:
    """Write the `gate_maps` (CNNs) or `attention_map` (ViTs) of ``model_name`` on the image as a PNG."""
    import timm

    kw = {} if num_classes is None else dict(num_classes=num_classes)
    model = timm.create_model(model_name, **kw)
    if checkpoint:
        from .engine.checkpoint import read_weights

        state = read_weights(checkpoint)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if len(missing) == len(model.state_dict()):
            raise ValueError(f'--checkpoint {checkpoint}: none of its tensors fits {model_name}')
    cfg = model.pretrained_cfg
    size = tuple(cfg.get('input_size', (3, 224, 224))[1:])
    image, shown = _load_image(image_path, size, cfg.get('mean', (0.485, 0.456, 0.406)),
                               cfg.get('std', (0.229, 0.224, 0.225)))
    plt = _plt()
    if hasattr(model, 'blocks') and hasattr(model, 'patch_embed'):
        w = attention_map(model, image, patch)
        fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
        ax.imshow(shown)
        ax.imshow(w.numpy(), cmap='magma', alpha=0.6, extent=(0, size[1], size[0], 0), interpolation='nearest')
        ax.set_title(f'{model_name}: last block, patch {patch or "centre"}', fontsize=9)
        ax.axis('off')
    else:
        gates = gate_maps(model, image)
        if not gates:
            raise ValueError(f'{model_name} has no visattn block to draw')
        spatial = [g for g in gates if g['varies'] in ('spatial', 'both')]
        channel = [g for g in gates if g['varies'] in ('channel', 'both')]
        pick = spatial[:: max(1, len(spatial) // 4)][:4] + channel[:: max(1, len(channel) // 4)][:4]
        fig, axes = plt.subplots(1, len(pick) + 1, figsize=(3 * (len(pick) + 1), 3), dpi=110, squeeze=False)
        axes[0, 0].imshow(shown)
        axes[0, 0].set_title(model_name, fontsize=8)
        axes[0, 0].axis('off')
        for ax, g in zip(axes[0, 1:], pick):
            if g in spatial and g['varies'] != 'channel':
                ax.imshow(shown)
                ax.imshow(g['spatial'].numpy(), cmap='magma', alpha=0.6, extent=(0, size[1], size[0], 0))
                ax.set_title(f'{g["name"]}: spatial gate', fontsize=7)
                ax.axis('off')
            else:
                ax.bar(range(len(g['channel'])), g['channel'].numpy(), width=1.0)
                ax.set_title(f'{g["name"]}: channel gate', fontsize=7)
                ax.set_xlabel('channel', fontsize=7)
    out = Path(out)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _pair(text: str, arg: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.split(','))
    except ValueError:
        raise ValueError(f'{arg} must be two ints i,j, got {text!r}') from None
    return a, b


def _value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='visattn viz', description=__doc__.split('\n\n')[0])
    sub = p.add_subparsers(dest='cmd', required=True)
    pp = sub.add_parser('pattern', help='which keys each query sees, as a PNG')
    pp.add_argument('name')
    pp.add_argument('--n', type=int, default=64, help='tokens of a mixer (default 64)')
    pp.add_argument('--size', type=int, default=16, help='H = W of a block (default 16)')
    pp.add_argument('--query', default=None, help='i,j: the query pixel of a block (default the centre)')
    pp.add_argument('--causal', action='store_true')
    pp.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help='a constructor argument')
    pp.add_argument('--out', default=None, help='the PNG (default <name>_pattern.png)')
    pp.add_argument('--text', action='store_true', help='also print the mask as text')
    pm = sub.add_parser('map', help="a model's attention on an image")
    pm.add_argument('model')
    pm.add_argument('--image', required=True)
    pm.add_argument('--checkpoint', default=None, help='weights (safetensors or a train.py checkpoint)')
    pm.add_argument('--num-classes', type=int, default=None)
    pm.add_argument('--patch', default=None, help='i,j: the patch of a ViT (default the centre)')
    pm.add_argument('--out', default=None, help='the PNG (default <model>_map.png)')
    pg = sub.add_parser('gallery', help='the gallery of patterns (patterns.png and patterns.txt)')
    pg.add_argument('--out-dir', default='docs')
    args = p.parse_args(argv)
    try:
        if args.cmd == 'pattern':
            kwargs = {}
            for item in args.set:
                key, sep, value = item.partition('=')
                if not sep:
                    raise ValueError(f'--set takes KEY=VALUE, got {item!r}')
                kwargs[key] = _value(value)
            query = None if args.query is None else _pair(args.query, '--query')
            pat = pattern(args.name, n=args.n, size=args.size, query=query, causal=args.causal, **kwargs)
            out = draw_pattern(pat, args.out or f'{pat.name}_pattern.png')
            if args.text:
                print(mask_text(pat))
            print(f'wrote {out}')
        elif args.cmd == 'map':
            patch = None if args.patch is None else _pair(args.patch, '--patch')
            out = draw_map(args.model, args.image, args.out or f'{args.model}_map.png', args.checkpoint, patch,
                           args.num_classes)
            print(f'wrote {out}')
        else:
            png, txt = gallery(args.out_dir)
            print(f'wrote {png} and {txt}')
    except (KeyError, ValueError, TypeError, ImportError) as e:
        print(f'visattn viz: error: {e}', file=sys.stderr)
        return 2
    return 0
