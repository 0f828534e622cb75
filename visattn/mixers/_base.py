"""What every token mixer shares: timm ``Attention``'s constructor, projections, masks and head split.

A mixer subclasses `TokenMixer` and implements ``attend(q, k, v, key_padding_mask, attn_mask, is_causal)`` on
``[B, H, N, D]`` tensors; the base class does the ``qkv`` projection (same parameter names and shapes as
timm's ``Attention``, so a pretrained ViT's weights load), the optional q/k norms, the output norm, ``proj``
and the dropouts, and turns the user's ``attn_mask`` into a key-padding mask where it is one.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_feat_size, check_int, check_prob, is_fx_proxy, masked_softmax_fp32, softmax_fp32


def normalize_mask(attn_mask: Tensor | None, batch: int, seq_len: int) -> tuple[Tensor | None, Tensor | None]:
    """Split a user mask into ``(key_padding_mask, dense_mask)``; at most one is not None.

    Accepted forms:
        - ``[B, N]`` bool: key padding, True = the token is real (attend to it), False = padding.
        - ``[B, 1, 1, N]`` bool: the same, in SDPA's broadcast layout.
        - any other bool or float mask that broadcasts to ``[B, H, N, N]`` (SDPA's convention: bool True =
          attend, float = added to the scores) is returned as ``dense_mask``.
    """
    if attn_mask is None:
        return None, None
    if not torch.jit.is_scripting():
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f'attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}')
    if attn_mask.dtype == torch.bool:
        if attn_mask.dim() == 2 and attn_mask.shape[0] == batch and attn_mask.shape[1] == seq_len:
            return attn_mask, None
        if attn_mask.dim() == 4 and attn_mask.shape[1] == 1 and attn_mask.shape[2] == 1 \
                and attn_mask.shape[3] == seq_len and (attn_mask.shape[0] == 1 or attn_mask.shape[0] == batch):
            return attn_mask[:, 0, 0].expand(batch, seq_len), None
    if attn_mask.dim() < 2 or attn_mask.shape[-1] != seq_len or (
            attn_mask.shape[-2] != 1 and attn_mask.shape[-2] != seq_len):
        raise ValueError(
            f'attn_mask must be a [B, N] bool key-padding mask or broadcast to [B, H, N, N] with N={seq_len}, '
            f'got shape {list(attn_mask.shape)}')
    return None, attn_mask


def combine_masks(
        key_padding_mask: Tensor | None, attn_mask: Tensor | None, is_causal: bool, seq_len: int,
        device: torch.device | None = None,
) -> Tensor | None:
    """One mask in SDPA's convention (bool True = attend, float = added to the scores), or None when none applies.

    Args:
        key_padding_mask: [B, N] bool, True = a real key.
        attn_mask: bool or float, broadcastable to [B, H, N, N].
        is_causal: also hide the keys after each query.
        seq_len: N.
        device: device of the causal mask (default: that of the other masks).

    Returns:
        A mask broadcastable to [B, H, N, N]: bool unless ``attn_mask`` is float.
    """
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    if is_causal:
        dev = device
        if dev is None:
            dev = mask.device if mask is not None else (attn_mask.device if attn_mask is not None else None)
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=dev).tril()
        mask = causal if mask is None else mask & causal
    if attn_mask is None:
        return mask
    if mask is None:
        return attn_mask
    if attn_mask.dtype == torch.bool:
        return attn_mask & mask
    return attn_mask.masked_fill(~mask, float('-inf'))


def dead_rows(mask: Tensor) -> Tensor:
    """Rows of a combined mask (see `combine_masks`) that hide every key: [..., N, 1] bool."""
    if mask.dtype == torch.bool:
        return ~mask.any(-1, keepdim=True)
    return torch.isneginf(mask).all(-1, keepdim=True)


def masked_softmax(
        logits: Tensor, key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None,
        is_causal: bool = False,
) -> Tensor:
    """Softmax over the last dim of ``logits`` [B, H, N, M] in fp32, under the masks; a fully masked row gives zeros.

    ``key_padding_mask`` is [B, M]; ``attn_mask`` broadcasts to [B, H, N, M] (SDPA's convention); ``is_causal``
    hides key j > query i (N == M).
    """
    mask = combine_masks(key_padding_mask, attn_mask, is_causal, logits.shape[-1], logits.device)
    if mask is None:
        return softmax_fp32(logits, dim=-1)
    if mask.dtype == torch.bool:
        mask, logits = torch.broadcast_tensors(mask, logits)
        return masked_softmax_fp32(logits, mask).to(logits.dtype)
    logits = logits + mask
    dead = torch.isneginf(logits).all(-1, keepdim=True)
    return softmax_fp32(logits.masked_fill(dead, 0.), dim=-1).masked_fill(dead, 0.)


def softmax_attention(
        q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None,
        is_causal: bool = False, dropout_p: float = 0., scale: float | None = None,
) -> Tensor:
    """``softmax(q kᵀ · scale + mask) v`` through ``scaled_dot_product_attention``; a fully masked row gives zeros.

    Args:
        q: [B, H, N, D]; k: [B, H, M, D]; v: [B, H, M, Dv].
        key_padding_mask: [B, M] bool, True = a real key.
        attn_mask: bool or float mask broadcastable to [B, H, N, M] (SDPA's convention).
        is_causal: query i sees keys j <= i.
        dropout_p: dropout on the attention weights.
        scale: default D^-0.5.

    Returns:
        [B, H, N, Dv].
    """
    if key_padding_mask is None and attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    mask = combine_masks(key_padding_mask, attn_mask, is_causal, k.shape[-2], q.device)
    assert mask is not None  # a mask was given; refines Optional[Tensor] for TorchScript
    dead = dead_rows(mask)
    if mask.dtype == torch.bool:
        mask = mask | dead
    else:
        mask = mask.masked_fill(dead, 0.).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out.masked_fill(dead, 0.)


def check_seq_len(seq_len: int | None, name: str = 'seq_len') -> int:
    """Validate a mixer's required length argument (``seq_len=``): a positive int; None (not given) is refused."""
    if seq_len is None:
        raise ValueError(f'{name} is required: a positive int (the fixed number of tokens N), got None')
    return check_int(name, seq_len)


def check_length(mixer: str, n: int, seq_len: int) -> None:
    """Raise a ``ValueError`` when an input of ``n`` tokens is longer than the ``seq_len`` a mixer was built for."""
    if n > seq_len:
        raise ValueError(
            f'{mixer} was built for seq_len={seq_len} tokens and cannot mix {n}; build it with seq_len>={n}')


class TokenMixer(nn.Module):
    """Base class of the 1-D token mixers: ``[B, N, C] -> [B, N, C]``.

    Args:
        dim: channels C of the tokens.
        num_heads: number of heads H (C must be divisible by H).
        qkv_bias: bias in the ``qkv`` projection.
        qk_norm: normalise q and k per head with ``norm_layer``.
        scale_norm: normalise the attention output with ``norm_layer`` before ``proj``.
        proj_bias: bias in ``proj``.
        attn_drop: dropout on attention weights (for mixers that form weights) or on the mixed values.
        proj_drop: dropout after ``proj``.
        norm_layer: norm used by ``qk_norm`` / ``scale_norm``.
        use_qkv: build the ``qkv`` projection (False for mixers that form no queries and keys).
        use_proj: build the output projection ``proj`` (False for mixers without one, e.g. FNet).
        device, dtype: factory arguments.

    Class attributes a subclass sets:
        supports_key_padding: ``attend`` honours a ``[B, N]`` key-padding mask.
        supports_dense_mask: ``attend`` honours an arbitrary ``[B, H, N, N]`` mask.
        supports_causal: ``attend`` honours ``is_causal=True``.
    """

    supports_key_padding: ClassVar[bool] = False
    supports_dense_mask: ClassVar[bool] = False
    supports_causal: ClassVar[bool] = False
    __constants__ = ['supports_key_padding', 'supports_dense_mask', 'supports_causal']  # seen by TorchScript

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            scale_norm: bool = False,
            proj_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            norm_layer: type[nn.Module] | None = None,
            *,
            use_qkv: bool = True,
            use_proj: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        check_int('dim', dim)
        check_int('num_heads', num_heads)
        check_prob('attn_drop', attn_drop)
        check_prob('proj_drop', proj_drop)
        if dim % num_heads:
            raise ValueError(f'dim={dim} must be divisible by num_heads={num_heads}')
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError('norm_layer must be given when qk_norm or scale_norm is True')
        self.mixer_name = type(self).__name__  # for error messages (TorchScript has no type(self))
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd) if use_qkv else None
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(dim, **dd) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd) if use_proj else nn.Identity()
        self.proj_drop = nn.Dropout(proj_drop)

    def split_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, N, C] -> q, k, v`` each ``[B, H, N, D]``, with the q/k norms applied."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def check_input(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool) -> tuple[Tensor | None, Tensor | None]:
        """Validate ``x`` and the masking request; return ``(key_padding_mask, dense_mask)``."""
        name = self.mixer_name
        if not torch.jit.is_scripting():
            if is_fx_proxy(x):
                return None, None
            if not isinstance(x, Tensor):
                raise ValueError(f'{name}: x must be [B, N, {self.dim}], got {type(x).__name__}')
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f'{name}: x must be [B, N, {self.dim}], got {list(x.shape)}')
        if is_causal and not self.supports_causal:
            raise ValueError(f'{name} cannot honour is_causal=True; see visattn.list_mixers(causal=True)')
        kpm, dense = normalize_mask(attn_mask, x.shape[0], x.shape[1])
        if kpm is not None and not (self.supports_key_padding or self.supports_dense_mask):
            raise ValueError(f'{name} cannot honour a padding mask (attn_mask)')
        if dense is not None and not self.supports_dense_mask:
            raise ValueError(
                f'{name} honours only a [B, N] bool key-padding attn_mask, got shape {list(dense.shape)}')
        if kpm is not None and not self.supports_key_padding:
            dense, kpm = kpm[:, None, None, :], None
        return kpm, dense

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        """Mix ``v`` ``[B, H, N, D]`` by the mechanism; return ``[B, H, N, D]``."""
        raise NotImplementedError

    def merge_heads(self, out: Tensor) -> Tensor:
        """``[B, H, N, D] -> [B, N, C]``, then the output norm, ``proj`` and dropout."""
        B, _, N, _ = out.shape
        return self.proj_drop(self.proj(self.norm(out.transpose(1, 2).reshape(B, N, self.dim))))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        kpm, dense = self.check_input(x, attn_mask, is_causal)
        q, k, v = self.split_heads(x)
        return self.merge_heads(self.attend(q, k, v, kpm, dense, is_causal))


class GridMixer(TokenMixer):
    """Base class of the token mixers that need the token grid: ``[B, P + H·W, C] -> [B, P + H·W, C]``.

    The first ``P = num_prefix_tokens`` tokens are timm's class and register tokens; the other ``H·W`` are the
    patch tokens in row-major order. Each mechanism says in its docstring what the prefix tokens see and how they
    are seen (by default they attend to every token and every patch token attends to them).

    Args (beyond `TokenMixer`'s):
        feat_size: (H, W) of the token grid the mixer is built for (an int for a square grid). Required.
        num_prefix_tokens: P, the class and register tokens before the patch tokens (0 for none).

    The grid at forward time is, in this order: the ``feat_size=`` argument of ``forward``; the grid that
    `visattn.models.track_grid` sets before each forward of a ViT built with ``dynamic_img_size=True``
    (``dynamic_grid``); the ``feat_size`` of construction. An input whose length is not ``P + H·W`` for that grid
    raises a ``ValueError``.

    A subclass implements ``mix(x, H, W, key_padding_mask, attn_mask, is_causal) -> [B, N, C]`` (the whole
    mixer, projections included; ``split_heads`` / ``merge_heads`` and ``split_prefix`` / ``join_prefix`` help).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            scale_norm: bool = False,
            proj_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            norm_layer: type[nn.Module] | None = None,
            *,
            feat_size: int | tuple[int, int] | None = None,
            num_prefix_tokens: int = 1,
            use_qkv: bool = True,
            use_proj: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            use_qkv=use_qkv, use_proj=use_proj, device=device, dtype=dtype)
        if feat_size is None:
            raise ValueError(
                f'{self.mixer_name} needs the token grid: feat_size=(H, W) is required (visattn.models.'
                'vit_mixer_layer gives it from a ViT\'s img_size and patch_size)')
        self.feat_size = check_feat_size('feat_size', feat_size)
        self.num_prefix_tokens = check_int('num_prefix_tokens', num_prefix_tokens, minimum=0)
        self.dynamic_grid: tuple[int, int] | None = None  # set by visattn.models.track_grid (eager only)

    def grid(self, x: Tensor, feat_size: tuple[int, int] | None = None) -> tuple[int, int]:
        """The (H, W) of ``x`` [B, N, C]; raises a ``ValueError`` when N is not ``num_prefix_tokens + H·W``."""
        if feat_size is not None:
            hw = feat_size
        else:
            dyn = self.dynamic_grid
            hw = dyn if dyn is not None else self.feat_size
        H, W = hw[0], hw[1]
        n = x.shape[1]
        if not torch.jit.is_scripting() and is_fx_proxy(x):
            return H, W
        if n != self.num_prefix_tokens + H * W:
            raise ValueError(
                f'{self.mixer_name} was given {n} tokens but its grid is {H}x{W} with {self.num_prefix_tokens} '
                f'prefix tokens ({self.num_prefix_tokens + H * W} tokens); pass feat_size= to forward, or build '
                'the ViT with dynamic_img_size=True and visattn.models.track_grid(model)')
        return H, W

    def split_prefix(self, x: Tensor, H: int, W: int) -> tuple[Tensor, Tensor]:
        """``[B, P + H·W, C] -> (prefix [B, P, C], grid [B, H, W, C])``."""
        P = self.num_prefix_tokens
        return x[:, :P], x[:, P:].reshape(x.shape[0], H, W, x.shape[-1])

    def join_prefix(self, prefix: Tensor, grid: Tensor) -> Tensor:
        """``(prefix [B, P, C], grid [B, H, W, C]) -> [B, P + H·W, C]``."""
        return torch.cat([prefix, grid.flatten(1, 2)], dim=1)

    def mix(
            self, x: Tensor, H: int, W: int, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        """Mix ``x`` [B, P + H·W, C] on its H×W grid; return [B, P + H·W, C]."""
        raise NotImplementedError

    def forward(
            self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
            feat_size: tuple[int, int] | None = None,
    ) -> Tensor:
        kpm, dense = self.check_input(x, attn_mask, is_causal)
        H, W = self.grid(x, feat_size)
        return self.mix(x, H, W, kpm, dense, is_causal)


def grid_for_length(n: int) -> tuple[tuple[int, int], int]:
    """A token grid and prefix count for ``n`` tokens, for tests and benchmarks: ``((H, W), P)`` with
    ``P + H·W = n``, P in (1, 0, 2) and the grid as square as those allow."""
    best = None
    for p in (1, 0, 2):
        m = n - p
        if m < 1:
            continue
        h = max(d for d in range(1, int(m ** 0.5) + 1) if m % d == 0)
        score = (m // h) / h
        if best is None or score < best[0] - 1e-9:
            best = (score, (h, m // h), p)
    if best is None:
        raise ValueError(f'n must be a positive int, got {n!r}')
    return best[1], best[2]


def length_kwargs(name: str, n: int) -> dict:
    """The construction arguments the mixer ``name`` needs to mix ``n`` tokens: ``seq_len=n`` for the fixed-length
    mixers, ``feat_size`` and ``num_prefix_tokens`` (see `grid_for_length`) for the grid mixers, else none."""
    from ..registry import info

    meta = info(f'mixer:{name}')
    if meta.requires_grid:
        hw, p = grid_for_length(n)
        return dict(feat_size=hw, num_prefix_tokens=p)
    return dict(seq_len=n) if meta.requires_seq_len else {}
