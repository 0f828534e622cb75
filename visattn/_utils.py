"""Helpers shared by every block, mixer and model: written once, here."""

from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn
from torch import Tensor


def make_divisible(value: float, divisor: int = 1, min_value: int | None = None, round_limit: float = 0.) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``min_value``, default ``divisor``); one
    ``divisor`` more where that lands below ``round_limit · value`` (timm's 0.9: never more than 10% down)."""
    if divisor < 1:
        raise ValueError(f'divisor must be >= 1, got {divisor}')
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < round_limit * value else rounded


def reduced_channels(
        channels: int,
        rd_ratio: float = 1 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        min_channels: int = 1,
        round_limit: float = 0.,
) -> int:
    """Width of a reduction bottleneck: ``rd_channels`` if given, else ``channels * rd_ratio`` rounded to
    a multiple of ``rd_divisor`` (the rd_ratio / rd_channels / rd_divisor trio of timm; ``round_limit`` as
    `make_divisible`)."""
    rd_ratio = check_float('rd_ratio', rd_ratio, 0., 1., low_open=True)
    check_int('rd_divisor', rd_divisor)
    if rd_channels is not None:
        return check_int('rd_channels', rd_channels)
    return make_divisible(channels * rd_ratio, rd_divisor, max(min_channels, rd_divisor), round_limit)


def check_channels(channels: int, name: str = 'channels') -> int:
    """Validate a constructor's channel count."""
    if isinstance(channels, bool) or not isinstance(channels, int):
        raise TypeError(f'{name} must be an int, got {type(channels).__name__}')
    if channels < 1:
        raise ValueError(f'{name} must be >= 1, got {channels}')
    return channels


def check_int(name: str, value: int, minimum: int | None = 1, maximum: int | None = None) -> int:
    """Validate an integer constructor argument: an ``int`` (not a bool) in ``[minimum, maximum]`` (None = open).

    Raises:
        TypeError: ``value`` is not an int, naming ``name``.
        ValueError: ``value`` is out of range, naming ``name``, the range and the value.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'{name} must be an int, got {type(value).__name__} {value!r}')
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        low = '-inf' if minimum is None else minimum
        high = 'inf' if maximum is None else maximum
        raise ValueError(f'{name} must be an int in [{low}, {high}], got {value!r}')
    return value


def check_float(
        name: str, value: float, low: float | None = None, high: float | None = None, *,
        low_open: bool = False, high_open: bool = False,
) -> float:
    """Validate a real constructor argument: an int or float (not a bool) in the interval ``low .. high``
    (``low_open`` / ``high_open`` exclude the ends; None = unbounded). Returns it as a float.

    Raises:
        TypeError: ``value`` is not a real number, naming ``name``.
        ValueError: ``value`` is outside the interval (or NaN), naming ``name``, the interval and the value.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f'{name} must be a number, got {type(value).__name__} {value!r}')
    value = float(value)
    bad = value != value
    if low is not None:
        bad = bad or value < low or (low_open and value == low)
    if high is not None:
        bad = bad or value > high or (high_open and value == high)
    if bad:
        interval = (('(' if low_open else '[') + ('-inf' if low is None else f'{low:g}') + ', '
                    + ('inf' if high is None else f'{high:g}') + (')' if high_open else ']'))
        raise ValueError(f'{name} must be in {interval}, got {value!r}')
    return value


def check_prob(name: str, value: float) -> float:
    """Validate a probability (a dropout rate, say): a number in [0, 1]."""
    return check_float(name, value, 0., 1.)


def check_odd(name: str, value: int) -> int:
    """Validate a kernel or neighbourhood size centred on its pixel: an odd int >= 1."""
    if check_int(name, value) % 2 == 0:
        raise ValueError(f'{name} must be an odd int >= 1 (centred on the pixel), got {value!r}')
    return value


def is_fx_proxy(x: Tensor) -> bool:
    """True for a ``torch.fx`` proxy: a traced value whose shape is unknown until the graph runs."""
    if not torch.jit.is_scripting():
        return isinstance(x, torch.fx.Proxy)
    return False


def check_nchw(x: Tensor, channels: int, block: str) -> None:
    """Raise a ``ValueError`` naming ``block`` unless ``x`` is ``[B, channels, H, W]``.

    Works in TorchScript (the check runs in the scripted graph); under ``torch.fx`` symbolic tracing it is
    skipped, as the traced value has no shape yet (visattn's blocks are leaves for timm's tracer, so the check
    runs when the traced graph calls them).
    """
    if not torch.jit.is_scripting():
        if is_fx_proxy(x):
            return
        if not isinstance(x, Tensor):
            raise TypeError(f'{block}: x must be a torch.Tensor, got {type(x).__name__}')
    if x.dim() != 4:
        raise ValueError(f'{block}: x must be [B, C, H, W] (4 dims), got shape {list(x.shape)}')
    if x.shape[1] != channels:
        raise ValueError(f'{block}: x has {x.shape[1]} channels, expected {channels} (shape {list(x.shape)})')


def softmax_fp32(x: Tensor, dim: int) -> Tensor:
    """Softmax computed in at least float32 (also under autocast) and returned in ``x``'s dtype."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return torch.softmax(x, dim=dim, dtype=torch.float32).to(x.dtype)
    return torch.softmax(x, dim=dim)


def mean_expanded_grad(x: Tensor, dim: list[int], keepdim: bool = False) -> Tensor:
    """``x.mean(dim)`` as the sum divided on the reduced tensor, so that its backward is a broadcast view of the
    small gradient: PyTorch's mean divides the expanded gradient into a new full-size map."""
    n = 1
    for d in dim:
        n *= x.shape[d]
    return x.sum(dim, keepdim=keepdim) / n


def needs_grad(tensors: list[Tensor]) -> bool:
    """True when autograd records an op on ``tensors``; in-place updates of intermediates are safe otherwise."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t.requires_grad:
            return True
    return False


def is_compiling() -> bool:
    """True while ``torch.compile`` traces: blocks take their plain PyTorch path there (the compiler fuses it),
    not their hand-written autograd functions and kernels."""
    return torch.compiler.is_compiling()


def fused_act_name(act: nn.Module, gate: nn.Module) -> str | None:
    """The ``visattn.ops.channel_gate`` name of a hidden activation when the gate is a sigmoid, else None."""
    if not isinstance(gate, nn.Sigmoid):
        return None
    return {nn.ReLU: 'relu', nn.SiLU: 'silu', nn.GELU: 'gelu'}.get(type(act))


def get_act(act_layer: type[nn.Module] | str | None, inplace: bool = False) -> nn.Module:
    """An activation module from a class or a timm activation name; ``None`` gives ``nn.Identity``."""
    if act_layer is None:
        return nn.Identity()
    if isinstance(act_layer, str):
        from timm.layers import get_act_layer

        act_layer = get_act_layer(act_layer)
    try:
        return act_layer(inplace=inplace)
    except TypeError:
        return act_layer()


def float_min(dtype: torch.dtype) -> float:
    """``torch.finfo(dtype).min`` of a compute dtype (float32 or float64 when scripted: TorchScript has no finfo)."""
    if not torch.jit.is_scripting():
        return torch.finfo(dtype).min
    return -1.7976931348623157e308 if dtype == torch.float64 else -3.4028234663852886e38


def float_tiny(dtype: torch.dtype) -> float:
    """``torch.finfo(dtype).tiny`` of a compute dtype (float32 or float64 when scripted, as `float_min`)."""
    if not torch.jit.is_scripting():
        return torch.finfo(dtype).tiny
    return 2.2250738585072014e-308 if dtype == torch.float64 else 1.1754943508222875e-38


def masked_softmax_fp32(scores: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax over ``dim`` in at least float32 of ``scores`` where ``mask`` is True; masked entries get 0 and a
    fully masked row gives zeros (never NaN, also in the backward). Returns float32 (float64 for float64)."""
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    scores = scores.masked_fill(~mask, float_min(scores.dtype))
    return torch.softmax(scores, dim=dim) * mask


def bind_defaults(cls: type, suffix: str, **defaults) -> type:
    """A subclass of ``cls`` named ``cls.__name__ + suffix`` whose constructor takes ``defaults`` as default
    keyword arguments: a class (not a ``functools.partial``), for factories that need one, e.g. timm's
    ``attn_layer=`` (it calls ``issubclass``). The same arguments give the same class."""
    key = (cls, suffix, tuple(sorted(defaults.items(), key=lambda kv: kv[0])))
    if key not in _BOUND:
        def __init__(self, *args, **kwargs):
            cls.__init__(self, *args, **{**defaults, **kwargs})

        _BOUND[key] = type(cls.__name__ + suffix, (cls,), {
            '__init__': __init__, '__module__': cls.__module__, '__doc__': cls.__doc__, 'bound_defaults': defaults})
    return _BOUND[key]


_BOUND: dict[tuple, type] = {}


def check_feat_size(name: str, value: int | tuple[int, int]) -> tuple[int, int]:
    """Validate a feature-map size given as an int (square) or an (H, W) pair of ints >= 1; returns (H, W)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f'{name} must be an int or an (H, W) pair, got {value!r}')
        return check_int(name, value[0]), check_int(name, value[1])
    return check_int(name, value), value


def shift_channel_groups(
        x: Tensor, bounds: list[int], offsets: list[tuple[int, int]], keep_border: bool = False,
        channels_last: bool = False,
) -> Tensor:
    """Shift channel groups spatially in one pass: channels ``bounds[k] .. bounds[k+1]`` (``bounds[0] = 0``) move by
    ``offsets[k] = (dy, dx)`` pixels, ``out[.., i, j] = x[.., i - dy, j - dx]``; the channels from ``bounds[-1]`` on
    are copied unchanged. Where the source pixel falls outside the map the output is 0, or with ``keep_border``
    the input's own value at that pixel (S²-MLP's in-place shift). ``x``: [B, C, H, W], or [B, H, W, C] with
    ``channels_last``."""
    cd, hd, wd = (3, 1, 2) if channels_last else (1, 2, 3)
    H, W = x.shape[hd], x.shape[wd]
    out = torch.empty_like(x)
    for k in range(len(offsets)):
        c0, c1 = bounds[k], bounds[k + 1]
        if c1 <= c0:
            continue
        dy, dx = offsets[k]
        src, dst = x.narrow(cd, c0, c1 - c0), out.narrow(cd, c0, c1 - c0)
        h, w = H - abs(dy), W - abs(dx)
        if h > 0 and w > 0:
            dst.narrow(hd, max(dy, 0), h).narrow(wd, max(dx, 0), w).copy_(
                src.narrow(hd, max(-dy, 0), h).narrow(wd, max(-dx, 0), w))
        # the strips the shift leaves uncovered: rows [0, dy) or [H + dy, H), columns likewise
        strips: list[tuple[int, int, int]] = []
        if dy != 0:
            strips.append((hd, 0 if dy > 0 else max(H + dy, 0), min(abs(dy), H)))
        if dx != 0:
            strips.append((wd, 0 if dx > 0 else max(W + dx, 0), min(abs(dx), W)))
        for dim, start, length in strips:
            if keep_border:
                dst.narrow(dim, start, length).copy_(src.narrow(dim, start, length))
            else:
                dst.narrow(dim, start, length).zero_()
    rest = x.shape[cd] - bounds[-1]
    if rest > 0:
        out.narrow(cd, bounds[-1], rest).copy_(x.narrow(cd, bounds[-1], rest))
    return out


def pad_hw_to_multiple(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Zero-pad ``x`` [B, C, H, W] at the bottom/right to multiples of ``block``; also the [Hp, Wp] validity mask."""
    H, W = x.shape[-2:]
    ph, pw = -H % block, -W % block
    valid = torch.ones(H, W, dtype=torch.bool, device=x.device)
    if ph or pw:
        x = nn.functional.pad(x, (0, pw, 0, ph))
        valid = nn.functional.pad(valid, (0, pw, 0, ph), value=False)
    return x, valid


def to_blocks(t: Tensor, block: int, heads: int) -> Tensor:
    """[B, heads·D, Hp, Wp] -> [B, heads, nH·nW, block², D] (non-overlapping blocks, row-major inside)."""
    B, C, Hp, Wp = t.shape
    t = t.view(B, heads, C // heads, Hp // block, block, Wp // block, block)
    return t.permute(0, 1, 3, 5, 4, 6, 2).reshape(B, heads, -1, block * block, C // heads)


def from_blocks(t: Tensor, block: int, Hp: int, Wp: int) -> Tensor:
    """Inverse of `to_blocks`: [B, heads, nH·nW, block², D] -> [B, heads·D, Hp, Wp]."""
    B, heads, _, _, D = t.shape
    t = t.view(B, heads, Hp // block, Wp // block, block, block, D)
    return t.permute(0, 1, 6, 2, 4, 3, 5).reshape(B, heads * D, Hp, Wp)


def conv_norm_act(
        in_channels: int, out_channels: int, kernel_size: int = 1, *, norm_layer: type[nn.Module] | None = None,
        act_layer: type[nn.Module] | str | None = None, bias: bool | None = None, device=None, dtype=None,
) -> nn.Sequential:
    """A k×k conv (bias only without a norm, unless ``bias`` says otherwise), then the norm and the activation where
    given, as children ``conv``, ``bn``, ``activate``: the layout (and state-dict keys) of mmcv's ``ConvModule``."""
    seq = nn.Sequential()
    bias = norm_layer is None if bias is None else bias
    seq.add_module('conv', nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias,
                                     device=device, dtype=dtype))
    if norm_layer is not None:
        seq.add_module('bn', norm_layer(out_channels, device=device, dtype=dtype))
    if act_layer is not None:
        seq.add_module('activate', get_act(act_layer, inplace=True))
    return seq


class QueryKeyValue2d(nn.Module):
    """Base of the 2-D blocks with 1×1-conv ``query`` and ``key`` (to ``rd_channels``), ``value`` (to ``channels``)
    and a learnable residual weight ``gamma`` that starts at 0 (CCNet's criss-cross and DANet's position attention).

    Subclasses define the residual term ``attend(x) = γ · attention(x)``; ``forward`` returns ``x + attend(x)``.
    """

    def __init__(self, channels: int, rd_channels: int, device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.block_name = type(self).__name__
        self.rd_channels = rd_channels
        self.query = nn.Conv2d(channels, rd_channels, 1, **dd)
        self.key = nn.Conv2d(channels, rd_channels, 1, **dd)
        self.value = nn.Conv2d(channels, channels, 1, **dd)
        self.gamma = nn.Parameter(torch.zeros(1, **dd))

    def reset_parameters(self) -> None:
        """Default conv initialisation; γ = 0, so that the block starts as the identity."""
        for conv in (self.query, self.key, self.value):
            conv.reset_parameters()
        nn.init.zeros_(self.gamma)

    def attend(self, x: Tensor) -> Tensor:
        """The residual term ``γ · attention(x)``: [B, C, H, W]."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, self.block_name)
        return x + self.attend(x)
