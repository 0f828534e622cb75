"""The one registry of visattn: name -> class, with the paper's metadata (`AttnInfo`) beside each class.

Three kinds of entries share it: 2-D blocks (``kind='attn'``, NCHW in and out), 1-D token mixers
(``kind='mixer'``, [B, N, C] in and out) and layers for a ViT's feed-forward slot (``kind='ffn'``, timm's
``mlp_layer=``, [B, N, C] in and out). Models registered with timm by visattn are recorded here too,
so that ``visattn.list_models()`` names exactly what importing visattn added to timm.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch.nn as nn

__all__ = [
    'AttnInfo', 'UnknownNameError', 'register', 'get_attn', 'create_attn', 'list_attn', 'get_mixer',
    'create_mixer', 'list_mixers', 'get_ffn', 'create_ffn', 'list_ffns', 'info', 'list_models', 'list_families',
    'register_model_name',
]

KINDS = ('attn', 'mixer', 'ffn')
_WHAT = {'attn': 'attention block', 'mixer': 'token mixer', 'ffn': 'feed-forward layer'}


@dataclass(frozen=True)
class AttnInfo:
    """Metadata of one mechanism.

    Attributes:
        name: registry name, e.g. ``'cbam'``.
        paper: the paper's title.
        arxiv: arXiv identifier, e.g. ``'1807.06521'``; ``''`` for a paper without one (then ``paper_url``).
        year: year of the paper.
        family: ``'channel'``, ``'spatial'``, ``'context'``, ``'local'``, ``'linear'``, ...
        complexity: cost in N = H·W (blocks) or N tokens (mixers), e.g. ``'O(N·C)'``.
        kind: ``'attn'`` for a 2-D block, ``'mixer'`` for a 1-D token mixer, ``'ffn'`` for a feed-forward layer.
        backends: the implementations available, ``('torch',)`` or ``('torch', 'triton')``.
        supports_causal: the mixer honours ``is_causal=True``.
        requires_seq_len: the mixer needs ``seq_len=`` at construction.
        requires_grid: the mixer needs the token grid: ``feat_size=(H, W)`` and ``num_prefix_tokens`` at
            construction (see `visattn.mixers.GridMixer`).
        cls_name: qualified name of the class.
        paper_url: where a paper without an arXiv id is published.
    """

    name: str
    paper: str
    arxiv: str
    year: int
    family: str
    complexity: str
    kind: str = 'attn'
    backends: tuple[str, ...] = ('torch',)
    supports_causal: bool = False
    requires_seq_len: bool = False
    requires_grid: bool = False
    cls_name: str = field(default='', compare=False)
    paper_url: str = ''

    @property
    def url(self) -> str:
        return f'https://arxiv.org/abs/{self.arxiv}' if self.arxiv else self.paper_url


class UnknownNameError(KeyError, ValueError):
    """An unknown registry name; a ``KeyError`` and a ``ValueError`` both catch it."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ''


_ENTRIES: dict[str, dict[str, tuple[type[nn.Module], AttnInfo]]] = {kind: {} for kind in KINDS}
_MODELS: list[str] = []


def _unknown(name: str, known: list[str], what: str) -> UnknownNameError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ''
    return UnknownNameError(f"Unknown {what} {name!r}.{hint} Known: {', '.join(sorted(known))}.")


def register(
        name: str,
        *,
        paper: str,
        arxiv: str,
        year: int,
        family: str,
        complexity: str,
        kind: str = 'attn',
        backends: tuple[str, ...] = ('torch',),
        supports_causal: bool = False,
        requires_seq_len: bool = False,
        requires_grid: bool = False,
        paper_url: str = '',
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator that registers a block or mixer under ``name`` and sets ``cls.attn_info``."""
    if kind not in KINDS:
        raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
    if not (arxiv or paper_url):
        raise ValueError(f'{name!r}: give the arXiv id or, for a paper without one, paper_url')

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _ENTRIES[kind]:
            raise ValueError(f'{kind} {name!r} is already registered by {_ENTRIES[kind][name][1].cls_name}')
        meta = AttnInfo(
            name=name, paper=paper, arxiv=arxiv, year=year, family=family, complexity=complexity, kind=kind,
            backends=tuple(backends), supports_causal=supports_causal, requires_seq_len=requires_seq_len,
            requires_grid=requires_grid, cls_name=f'{cls.__module__}.{cls.__qualname__}', paper_url=paper_url,
        )
        _ENTRIES[kind][name] = (cls, meta)
        if 'attn_info' not in cls.__dict__:  # its own, not a registered base class's
            cls.attn_info = meta
        return cls

    return wrap


def _lookup(name: str, kind: str) -> tuple[type[nn.Module], AttnInfo]:
    if not isinstance(name, str):
        raise TypeError(f'name must be a str, got {type(name).__name__}')
    entries = _ENTRIES[kind]
    key = name.lower()
    if key not in entries:
        raise _unknown(name, list(entries), _WHAT[kind])
    return entries[key]


def get_attn(name: str | type[nn.Module]) -> type[nn.Module]:
    """The class of the 2-D block ``name``; usable as timm's ``attn_layer=``.

    ``'mixer:<mixer name>'`` gives the token mixer ``<mixer name>`` wrapped as a 2-D block (``MixerAttn2d``).
    """
    if isinstance(name, type) and issubclass(name, nn.Module):
        return name
    if isinstance(name, str) and name.lower().startswith('mixer:'):  # any token mixer as a 2-D block
        return _lookup('mixer', 'attn')[0].for_mixer(name.split(':', 1)[1])
    return _lookup(name, 'attn')[0]


def create_attn(name: str | type[nn.Module], channels: int, **kwargs) -> nn.Module:
    """Build the 2-D block ``name`` for ``channels`` channels: ``[B, C, H, W] -> [B, C, H', W']``."""
    return get_attn(name)(channels, **kwargs)


def get_mixer(name: str | type[nn.Module]) -> type[nn.Module]:
    """The class of the token mixer ``name``; usable as timm ViT's ``attn_layer=``."""
    if isinstance(name, type) and issubclass(name, nn.Module):
        return name
    return _lookup(name, 'mixer')[0]


def create_mixer(name: str | type[nn.Module], dim: int, num_heads: int = 8, **kwargs) -> nn.Module:
    """Build the token mixer ``name``: ``[B, N, dim] -> [B, N, dim]``."""
    return get_mixer(name)(dim, num_heads=num_heads, **kwargs)


def get_ffn(name: str | type[nn.Module]) -> type[nn.Module]:
    """The class of the feed-forward layer ``name``; usable as timm ViT's ``mlp_layer=``."""
    if isinstance(name, type) and issubclass(name, nn.Module):
        return name
    return _lookup(name, 'ffn')[0]


def create_ffn(name: str | type[nn.Module], in_features: int, hidden_features: int | None = None,
               **kwargs) -> nn.Module:
    """Build the feed-forward layer ``name``: ``[B, N, in_features] -> [B, N, out_features]``."""
    return get_ffn(name)(in_features, hidden_features, **kwargs)


def list_ffns(family: str | None = None) -> list[str]:
    """Names of the registered feed-forward layers (timm ViT's ``mlp_layer=``)."""
    return _list('ffn', family)


def list_families(kind: str = 'attn') -> list[str]:
    """The families that the registered entries of ``kind`` belong to."""
    return sorted({meta.family for _, meta in _ENTRIES[kind].values()})


def _list(kind: str, family: str | None) -> list[str]:
    if family is not None and family not in list_families(kind):
        raise ValueError(f'Unknown family {family!r}; known: {", ".join(list_families(kind))}.')
    return sorted(n for n, (_, meta) in _ENTRIES[kind].items() if family is None or meta.family == family)


def list_attn(family: str | None = None) -> list[str]:
    """Names of the registered 2-D blocks, optionally of one ``family`` (``'channel'``, ``'spatial'``, ...)."""
    return _list('attn', family)


def list_mixers(causal: bool | None = None, family: str | None = None) -> list[str]:
    """Names of the registered token mixers; ``causal=True`` keeps those that honour ``is_causal=True``."""
    names = _list('mixer', family)
    if causal is None:
        return names
    return [n for n in names if _ENTRIES['mixer'][n][1].supports_causal == bool(causal)]


def info(name: str) -> AttnInfo:
    """The `AttnInfo` of a block, mixer or feed-forward layer. ``'attn:<name>'`` / ``'mixer:<name>'`` /
    ``'ffn:<name>'`` pick the kind when several have the name."""
    if not isinstance(name, str):
        raise TypeError(f'name must be a str, got {type(name).__name__}')
    kind, _, short = name.rpartition(':')
    if kind:
        if kind not in KINDS:
            raise ValueError(f'Unknown kind {kind!r} in {name!r}; use one of {KINDS}')
        return _lookup(short, kind)[1]
    for kind in KINDS:
        if name.lower() in _ENTRIES[kind]:
            return _ENTRIES[kind][name.lower()][1]
    raise _unknown(name, [n for kind in KINDS for n in _ENTRIES[kind]], 'block, mixer or feed-forward layer')


def register_model_name(name: str) -> None:
    """Record a timm model name that visattn registers."""
    if name not in _MODELS:
        _MODELS.append(name)


def list_models(pattern: str | None = None) -> list[str]:
    """The timm model names that visattn registers (``fnmatch`` ``pattern`` optional)."""
    import fnmatch

    names = sorted(_MODELS)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]
