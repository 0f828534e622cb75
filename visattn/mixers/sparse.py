"""Fixed sparse patterns: sliding window, window + global tokens, BigBird blocks, Sparse Transformer.

Papers:
    - "Longformer: The Long-Document Transformer", Beltagy, Peters, Cohan, 2020, arXiv:2004.05150
      (https://arxiv.org/abs/2004.05150): ``local`` (sliding window with dilation) and ``longformer``
      (window + symmetric global attention, global tokens with their own projections).
    - "Big Bird: Transformers for Longer Sequences", Zaheer et al., NeurIPS 2020, arXiv:2007.14062
      (https://arxiv.org/abs/2007.14062): ``bigbird`` (blocked window + global blocks + random blocks, ITC).
    - "Generating Long Sequences with Sparse Transformers", Child, Gray, Radford, Sutskever, 2019,
      arXiv:1904.10509 (https://arxiv.org/abs/1904.10509): ``sparse_strided`` and ``sparse_fixed``.

None of them forms an ``N x N`` matrix: the window is computed block by block against a band of keys,
BigBird takes its window blocks as shifted block diagonals and gathers only its random blocks, the strided
pattern works on residue classes and the fixed one on blocks plus the gathered summary columns. Each piece
keeps its log-sum-exp (BigBird: its row maximum), so the union of the pieces is one exact softmax.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_int
from ..ops import local_attention_1d
from ..ops.local1d import local_attention_1d_naive
from ..registry import register
from ._base import TokenMixer
from ._sparse_utils import (
    SeededMixin,
    attention_lse,
    hash_uniform,
    key_mask_of,
    merge_lse,
    merge_residues,
    pad_to_multiple,
    split_residues,
    window_attention_lse,
)

__all__ = ['LocalAttention', 'LongformerAttention', 'BigBirdAttention', 'SparseStridedAttention',
           'SparseFixedAttention']


def check_odd_window(window: int) -> int:
    """Validate a centred window length (keys per query): an odd positive int."""
    check_int('window', window)
    if window % 2 == 0:
        raise ValueError(f'window must be odd (keys per query, centred on the query), got {window}')
    return window


@register(
    'local', paper='Longformer: The Long-Document Transformer (sliding window)', arxiv='2004.05150', year=2020,
    family='sparse', complexity='O(N·w)', kind='mixer', backends=('torch', 'triton'), supports_causal=True,
)
class LocalAttention(TokenMixer):
    """Sliding-window attention with dilation, the window of `visattn.ops.local_attention_1d`: token i attends
    to ``i + t·dilation`` for ``|t| <= window // 2``, or for ``-(window - 1) <= t <= 0`` when causal.

    Without a padding mask (and without attention dropout) the call goes to `visattn.ops.local_attention_1d`
    (Triton on CUDA); with one, to the same blocked computation with the padded keys masked.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`).
        window: keys per query, odd (the window is centred on the query; causal: the ``window`` keys ending at it).
        dilation: gap between attended keys (Longformer's dilated window; 1 = contiguous).
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask``: [B, N] bool key padding (True = real token).
    """

    supports_key_padding = True
    supports_causal = True

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
            window: int = 129,
            dilation: int = 1,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        self.window = check_odd_window(window)
        self.dilation = check_int('dilation', dilation)

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        dropout_p = self.attn_drop.p if self.training else 0.
        if key_padding_mask is None and dropout_p == 0.:
            if torch.jit.is_scripting():  # the PyTorch path, which the eager call takes on a CPU
                return local_attention_1d_naive(q, k, v, self.window, self.dilation, is_causal, self.scale)
            return local_attention_1d(
                q, k, v, window=self.window, dilation=self.dilation, causal=is_causal, scale=self.scale)
        return window_attention_lse(
            q, k, v, window=self.window - 1 if is_causal else self.window // 2, dilation=self.dilation,
            causal=is_causal, scale=self.scale, key_mask=key_mask_of(key_padding_mask, q), dropout_p=dropout_p)[0]


@register(
    'longformer', paper='Longformer: The Long-Document Transformer', arxiv='2004.05150', year=2020,
    family='sparse', complexity='O(N·(w + g))', kind='mixer', supports_causal=True,
)
class LongformerAttention(TokenMixer):
    """Longformer attention: a sliding window for every token plus symmetric global attention.

    The global tokens (the cls token, index 0, by default) attend to every token and every token attends to
    them. As in the paper, the rows of the global tokens use their own projections (``qkv_global``) while the
    window and the columns of the global tokens use ``qkv``, and the global projections start equal to the
    local ones: at construction, and when a state dict without ``qkv_global`` (a timm ViT's) is loaded.
    Causal: the window is the ``window`` keys ending at the query, a global token is seen only by the tokens
    at or after it and sees only the tokens up to it.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`).
        window: keys per query in the sliding window, odd (centred: ``window // 2`` on each side).
        dilation: gap between window keys.
        global_tokens: indices of the global tokens (negative indices count from the end).
        global_proj: separate q/k/v projections for the global rows (the paper); False reuses ``qkv``.
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask``: [B, N] bool key padding (True = real token).
    """

    supports_key_padding = True
    supports_causal = True

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
            window: int = 129,
            dilation: int = 1,
            global_tokens: Sequence[int] = (0,),
            global_proj: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        self.window = check_odd_window(window)
        self.dilation = check_int('dilation', dilation)
        if isinstance(global_tokens, int) or not all(isinstance(i, int) for i in global_tokens):
            raise TypeError(f'global_tokens must be a sequence of ints, got {global_tokens!r}')
        self.global_tokens = tuple(global_tokens)
        self.qkv_global = nn.Linear(dim, dim * 3, bias=qkv_bias, device=device, dtype=dtype) if global_proj else None
        if self.qkv_global is not None and self.qkv.weight.device.type != 'meta':
            self.qkv_global.load_state_dict(self.qkv.state_dict())  # the paper: Qg, Kg, Vg start as Qs, Ks, Vs

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # weights without global projections (a timm ViT's): the global rows start from the local ones
        if self.qkv_global is not None:
            for name in ('weight', 'bias'):
                src, dst = f'{prefix}qkv.{name}', f'{prefix}qkv_global.{name}'
                if src in state_dict and dst not in state_dict:
                    state_dict[dst] = state_dict[src].clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def global_index(self, seq_len: int, device: torch.device | None = None) -> Tensor:
        """The sorted, unique global token positions for a sequence of ``seq_len`` tokens."""
        bad: list[int] = []
        positions: list[int] = []
        for i in self.global_tokens:  # plain loops and lists: TorchScript takes no set or comprehension-if
            if not -seq_len <= i < seq_len:
                bad.append(i)
            elif i % seq_len not in positions:
                positions.append(i % seq_len)
        if len(bad):
            raise ValueError(f'global_tokens {bad} are out of range for a sequence of {seq_len} tokens')
        positions.sort()
        return torch.tensor(positions, dtype=torch.long, device=device)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        kpm, _ = self.check_input(x, attn_mask, is_causal)
        q, k, v = self.split_heads(x)
        N = x.shape[1]
        g = self.global_index(N, x.device)
        key_mask = key_mask_of(kpm, q)  # [B, 1, N]
        dropout_p = self.attn_drop.p if self.training else 0.
        is_global = torch.zeros(N, dtype=torch.bool, device=x.device).index_fill(0, g, True)
        parts: list[tuple[Tensor, Tensor]] = []
        pos = torch.arange(N, device=x.device)
        if len(g) < N:
            parts.append(window_attention_lse(
                q, k, v, window=self.window - 1 if is_causal else self.window // 2, dilation=self.dilation,
                causal=is_causal, key_mask=key_mask & ~is_global, scale=self.scale, dropout_p=dropout_p))
        if len(g):  # every token also sees the global tokens (one softmax with its window)
            mask = key_mask[:, :, g].unsqueeze(-2)  # [B, 1, 1, G]
            if is_causal:
                mask = mask & (g[None, :] <= pos[:, None])
            parts.append(attention_lse(q, k[:, :, g], v[:, :, g], mask, scale=self.scale, dropout_p=dropout_p))
        out = merge_lse(parts)
        if len(g):  # the global tokens see every token, through their own projections
            qg, kg, vg = q, k, v
            if self.qkv_global is not None:
                qg, kg, vg = self.qkv_global(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(
                    2, 0, 3, 1, 4).unbind(0)
                qg, kg = self.q_norm(qg), self.k_norm(kg)
            mask = key_mask.unsqueeze(-2)  # [B, 1, 1, N]
            if is_causal:
                mask = mask & (pos[None, :] <= g[:, None])
            rows = attention_lse(qg[:, :, g], kg, vg, mask, scale=self.scale, dropout_p=dropout_p)[0]
            out = out.index_copy(2, g, rows.to(out.dtype))
        return self.merge_heads(out)


@register(
    'bigbird', paper='Big Bird: Transformers for Longer Sequences', arxiv='2007.14062', year=2020,
    family='sparse', complexity='O(N·b·(w + r + g))', kind='mixer',
)
class BigBirdAttention(SeededMixin, TokenMixer):
    """BigBird block-sparse attention (ITC): window blocks, global blocks and random blocks.

    The sequence is cut into blocks of ``block_size`` tokens. Query block i attends to the key blocks
    ``i - w//2 .. i + w//2`` (w = ``num_window_blocks``), to the global blocks (the first
    ``ceil(g/2)`` and the last ``floor(g/2)`` blocks, g = ``num_global_blocks``) and to
    ``num_random_blocks`` other blocks drawn per head; the global blocks attend to every token. The random
    blocks are drawn from ``seed`` and the number of blocks, so a module is deterministic; `block_layout`
    returns them.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`).
        block_size: tokens per block (the paper: 64).
        num_window_blocks: odd number of neighbouring blocks in the window (the paper: 3).
        num_global_blocks: global blocks (the paper's ITC: 2, the first and the last).
        num_random_blocks: random key blocks per query block (the paper: 3).
        seed: seed of the random blocks (default None: drawn from torch's generator at construction, so every
            layer differs; kept in the state dict, see `SeededMixin`).
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask``: [B, N] bool key padding (True = real token).
    """

    supports_key_padding = True

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
            block_size: int = 64,
            num_window_blocks: int = 3,
            num_global_blocks: int = 2,
            num_random_blocks: int = 3,
            seed: int | None = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        self.block_size = check_int('block_size', block_size)
        self.num_window_blocks = check_int('num_window_blocks', num_window_blocks)
        if num_window_blocks % 2 == 0:
            raise ValueError(f'num_window_blocks must be odd, got {num_window_blocks}')
        self.num_global_blocks = check_int('num_global_blocks', num_global_blocks, 0)
        self.num_random_blocks = check_int('num_random_blocks', num_random_blocks, 0)
        self.init_seed(seed)
        self._layouts = {}  # (seed, num_blocks) -> block_layout, in eager

    def block_layout(self, num_blocks: int) -> tuple[Tensor, Tensor, Tensor]:
        """The block pattern for ``num_blocks`` blocks (CPU tensors; cached in eager, rebuilt when scripted).

        Returns:
            ``(key_blocks [H, nb, K] long, valid [H, nb, K] bool, global_blocks [G] long)``: the key blocks that
            query block i of head h sees are ``key_blocks[h, i][valid[h, i]]`` (no block twice); the global
            blocks see every block.
        """
        if torch.jit.is_scripting():
            return self._build_layout(num_blocks)
        else:
            key = (self.seed, num_blocks)  # the seed may change when a state dict is loaded
            if key not in self._layouts:
                self._layouts[key] = self._build_layout(num_blocks)
            return self._layouts[key]

    def _build_layout(self, num_blocks: int) -> tuple[Tensor, Tensor, Tensor]:
        H, nb, half = self.num_heads, num_blocks, self.num_window_blocks // 2
        lo, hi = _global_bounds(self.num_global_blocks, nb)
        glob = torch.cat([torch.arange(lo), torch.arange(hi, nb)])  # the first lo and the last nb - hi blocks
        blocks = torch.arange(nb)
        is_glob = (blocks < lo) | (blocks >= hi)
        i = blocks[:, None]
        win = i + torch.arange(-half, half + 1)[None, :]  # [nb, w]
        win_ok = (win >= 0) & (win < nb)
        win = win.clamp(0, nb - 1)
        win_ok &= ~is_glob[win]
        near = ((blocks[None, :] - i).abs() <= half) | is_glob[None, :]  # [nb, nb]: window or global
        r = min(self.num_random_blocks, nb)
        scores = hash_uniform(self.seed, [H, nb, nb], stream=nb).masked_fill(near, -1.)
        top_values, rnd = scores.topk(r, dim=-1)
        g = glob.expand(nb, -1)
        key_blocks = torch.cat([win.expand(H, -1, -1), g.expand(H, -1, -1), rnd], dim=-1)
        valid = torch.cat([win_ok.expand(H, -1, -1), torch.ones(H, nb, glob.shape[0], dtype=torch.bool),
                           top_values >= 0], dim=-1)
        return key_blocks, valid, glob

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        N, b = q.shape[-2], self.block_size
        nb = -(-N // b)
        key_blocks, valid, glob = self.block_layout(nb)
        # the global blocks are the first ``lo`` and the last ``nb - hi`` blocks: blocks lo..hi-1 are the others
        lo, hi = _global_bounds(self.num_global_blocks, nb)
        dropout_p = self.attn_drop.p if self.training else 0.
        key_mask = None if key_padding_mask is None else key_mask_of(key_padding_mask, q)  # [B, 1, N]
        # the rows of the global blocks, cut at N: static lengths (no boolean indexing)
        rows = torch.cat([torch.arange(min(lo * b, N), device=q.device),
                          torch.arange(min(hi * b, N), N, device=q.device)])
        full = q.new_zeros([q.shape[0], q.shape[1], 0, q.shape[3]])
        if rows.numel() > 0:  # the global blocks see every token
            full = attention_lse(q[:, :, rows], k, v, None if key_mask is None else key_mask.unsqueeze(-2),
                                 scale=self.scale, dropout_p=dropout_p)[0]
        if hi == lo:
            return full
        start = self.num_window_blocks + glob.shape[0]  # the random blocks follow the window and global ones
        rnd, rnd_ok = key_blocks[:, lo:hi, start:].to(q.device), valid[:, lo:hi, start:].to(q.device)
        # one head at a time: the score pieces of a head are small enough to stay in cache between passes
        heads: list[Tensor] = []
        for h in range(q.shape[1]):
            heads.append(self._sparse_rows(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], key_mask, lo, hi, rows,
                                           rnd[h:h + 1], rnd_ok[h:h + 1], dropout_p))
        mid = torch.cat(heads, dim=1)
        return torch.cat([full[:, :, :lo * b], mid, full[:, :, lo * b:]], dim=2)[:, :, :N]

    def _sparse_rows(
            self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, lo: int, hi: int, cols: Tensor,
            rnd: Tensor, rnd_ok: Tensor, dropout_p: float,
    ) -> Tensor:
        """Attention of the non-global query blocks ``lo .. hi - 1`` over their window, global and random blocks.

        The window is one block diagonal per offset (query block i against key block i + d, the shifted block
        view of the keys), the global tokens ``cols`` are one matmul shared by every query, and only the random
        blocks are gathered. The pieces share one softmax: a common row maximum and one normaliser.

        Returns:
            [B, H, (hi - lo)·b, D].
        """
        masked = -1e30  # MASKED
        B, H, N, D = q.shape
        b, half, m = self.block_size, self.num_window_blocks // 2, hi - lo
        nb = -(-N // b)
        q = pad_to_multiple(q, b, -2).unflatten(-2, (nb, b))  # [B, H, nb, b, D]
        k = pad_to_multiple(k, b, -2).unflatten(-2, (nb, b))
        v = pad_to_multiple(v, b, -2).unflatten(-2, (nb, b))
        qm = (q[:, :, lo:hi] * self.scale).contiguous()
        dtype = torch.promote_types(q.dtype, torch.float32)
        key_ok: Tensor | None = None  # [B, 1, nb, b], only when some key of the pieces is padding
        if key_mask is not None or nb * b != N:
            if key_mask is None:
                key_mask = torch.ones(1, 1, N, dtype=torch.bool, device=q.device)
            key_ok = pad_to_multiple(key_mask, b, -1, False).unflatten(-1, (nb, b))

        parts: list[tuple[Tensor, Tensor]] = []  # (scores [B, H, m, b, n], values [B, H, m, n, D] or [B, H, n, D])
        # window: key block lo + j + d for query block j, when it is not global (inside lo .. hi - 1)
        kw = F.pad(k[:, :, lo:hi], (0, 0, 0, 0, half, half))  # [B, H, m + 2·half, b, D]
        vw = F.pad(v[:, :, lo:hi], (0, 0, 0, 0, half, half))
        ok_w: Tensor | None = None
        if key_ok is not None:
            ok_w = F.pad(key_ok[:, :, lo:hi], (0, 0, half, half), value=False)
        for d in range(-half, half + 1):
            s = _scores(qm, kw[:, :, half + d:half + d + m], dtype)
            s[:, :, :max(0, -d)] = masked
            s[:, :, max(0, m - d):] = masked
            if ok_w is not None:
                s.masked_fill_(~ok_w[:, :, half + d:half + d + m, None, :], masked)
            parts.append((s, vw[:, :, half + d:half + d + m]))
        if cols.numel() > 0:  # global tokens, seen by every query
            s = _scores(qm.flatten(2, 3), k.flatten(2, 3)[:, :, cols], dtype).unflatten(2, (m, b))
            if key_ok is not None:
                s.masked_fill_(~key_ok.flatten(2, 3)[:, :, cols][:, :, None, None], masked)
            parts.append((s, v.flatten(2, 3)[:, :, cols]))
        r = rnd.shape[-1]
        if r > 0:  # random blocks, gathered per head: [B, H, m, r·b, D]
            idx = (torch.arange(H, device=q.device)[:, None, None] * nb + rnd).flatten()
            vr = _gather_blocks(v, idx).view(B, H, m, r * b, D)
            s = _scores(qm, _gather_blocks(k, idx).view(B, H, m, r * b, D), dtype)
            s.unflatten(-1, (r, b)).masked_fill_(~rnd_ok[:, :, None, :, None], masked)
            if key_ok is not None:
                s.masked_fill_(~key_ok[:, 0][:, rnd].flatten(-2).unsqueeze(-2), masked)
            parts.append((s, vr))
        maxima: list[Tensor] = []
        for s, _ in parts:
            maxima.append(s.amax(-1))
        top = torch.stack(maxima).amax(0).unsqueeze(-1).detach()  # [B, H, m, b, 1]
        out = qm.new_zeros([B, H, m, b, D], dtype=dtype)
        denom = top.new_zeros(top.shape)
        for s, val in parts:
            p = s.sub_(top).exp_()  # masked pairs: exp(MASKED - top) = 0 unless the whole row is masked
            denom = denom + p.sum(-1, keepdim=True)
            if p.dim() != val.dim():  # the global piece: every query block against the same keys
                p = p.flatten(2, 3)
            prod = torch.matmul((F.dropout(p, dropout_p, True) if dropout_p > 0. else p).to(v.dtype), val)
            out = out + prod.view(B, H, m, b, D)
        out = out / denom
        if key_ok is not None:  # a row that sees no key outputs zeros
            out = out.masked_fill(top <= masked / 2, 0.)
        return out.to(v.dtype).flatten(2, 3)


def _global_bounds(num_global_blocks: int, num_blocks: int) -> tuple[int, int]:
    """BigBird's global blocks are blocks ``0 .. lo - 1`` and ``hi .. nb - 1`` (the first ``ceil(g/2)`` and the last
    ``floor(g/2)``, cut at ``nb``): the others are ``lo .. hi - 1``."""
    lo = min((num_global_blocks + 1) // 2, num_blocks)
    return lo, max(lo, num_blocks - num_global_blocks + lo)


def _scores(queries: Tensor, keys: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.matmul(queries, keys.transpose(-1, -2)).to(dtype)


def _gather_blocks(t: Tensor, idx: Tensor) -> Tensor:
    """Blocks ``idx`` of ``t: [B, H, nb, b, D]``, numbered ``h·nb + i``: [B, len(idx), b, D]."""
    return t.contiguous().flatten(1, 2).index_select(1, idx)


class _SparseTransformerBase(TokenMixer):
    """Shared constructor of the two Sparse Transformer patterns (``stride`` l, default ``ceil(sqrt(N))``)."""

    supports_key_padding = True
    supports_causal = True
    uses_summary: ClassVar[bool] = False

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
            stride: int | None = None,
            summary: int | None = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        self.stride = None if stride is None else check_int('stride', stride)
        if self.uses_summary:
            self.summary = check_int('summary', 8 if summary is None else summary)
        elif summary is not None:
            raise ValueError(f'summary is an argument of sparse_fixed, not of {type(self).__name__}, got {summary}')

    def stride_for(self, seq_len: int) -> int:
        """The stride l used for a sequence of ``seq_len`` tokens."""
        return self.stride if self.stride is not None else max(1, math.ceil(math.sqrt(seq_len)))


@register(
    'sparse_strided', paper='Generating Long Sequences with Sparse Transformers (strided)', arxiv='1904.10509',
    year=2019, family='sparse', complexity='O(N·sqrt(N))', kind='mixer', supports_causal=True,
)
class SparseStridedAttention(_SparseTransformerBase):
    """Sparse Transformer, strided pattern (one merged head per head): token i attends to j when
    ``|i - j| < l`` (the local part) or ``(i - j) mod l = 0`` (the strided part); ``j <= i`` when causal.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`).
        stride: l (default ``ceil(sqrt(N))``, the paper's choice, giving O(N·sqrt(N))).
        summary: not used by this pattern (an argument of ``sparse_fixed``); must stay None.
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask``: [B, N] bool key padding (True = real token).
    """

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        N = q.shape[-2]
        stride = self.stride_for(N)
        key_mask = key_mask_of(key_padding_mask, q)
        dropout_p = self.attn_drop.p if self.training else 0.
        local = window_attention_lse(
            q, k, v, window=stride - 1, causal=is_causal, key_mask=key_mask, scale=self.scale, dropout_p=dropout_p)
        n = -(-N // stride)  # tokens per residue class
        a = torch.arange(n, device=q.device)
        pair = a[None, :] < a[:, None] if is_causal else a[None, :] != a[:, None]  # no self: it is in the window
        kr = split_residues(key_mask, stride, feat=False, value=False)  # [B, 1, l, n]
        out, lse = attention_lse(
            split_residues(q, stride), split_residues(k, stride), split_residues(v, stride),
            kr.unsqueeze(-2) & pair, scale=self.scale, dropout_p=dropout_p)
        return merge_lse([local, (merge_residues(out, N), merge_residues(lse, N, feat=False))])


@register(
    'sparse_fixed', paper='Generating Long Sequences with Sparse Transformers (fixed)', arxiv='1904.10509',
    year=2019, family='sparse', complexity='O(N·sqrt(N))', kind='mixer', supports_causal=True,
)
class SparseFixedAttention(_SparseTransformerBase):
    """Sparse Transformer, fixed pattern (one merged head per head): token i attends to j in its own block of
    l tokens (``floor(j/l) = floor(i/l)``) and to the summary columns ``j mod l >= l - c`` of every block;
    ``j <= i`` when causal.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`).
        stride: block length l (default ``ceil(sqrt(N))``).
        summary: c, summary tokens at the end of each block (default 8; the paper: 8 to 32 for l = 128 to 256).
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask``: [B, N] bool key padding (True = real token).
    """

    uses_summary = True

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        N = q.shape[-2]
        stride = self.stride_for(N)
        c = min(self.summary, stride)
        nb = -(-N // stride)
        key_mask = key_mask_of(key_padding_mask, q)
        dropout_p = self.attn_drop.p if self.training else 0.
        a = torch.arange(stride, device=q.device)
        pair = a[None, :] <= a[:, None] if is_causal else None
        blocks = pad_to_multiple(key_mask, stride, -1, False).unflatten(-1, (nb, stride)).unsqueeze(-2)
        qb, kb, vb = (pad_to_multiple(t, stride, -2).unflatten(-2, (nb, stride)) for t in (q, k, v))
        own, own_lse = attention_lse(qb, kb, vb, blocks if pair is None else blocks & pair, scale=self.scale,
                                     dropout_p=dropout_p)
        parts = [(own.flatten(2, 3)[:, :, :N], own_lse.flatten(-2)[..., :N])]
        # the summary columns, block by block and cut at N (the last block may be short): a static length
        cols = (torch.arange(nb, device=q.device)[:, None] * stride
                + torch.arange(stride - c, stride, device=q.device)).flatten()
        cols = cols[:(nb - 1) * c + max(0, min(c, N - (nb - 1) * stride - (stride - c)))]
        if len(cols):
            rows = torch.arange(N, device=q.device)
            other = (cols[None, :] // stride) != (rows[:, None] // stride)  # the own block is counted above
            if is_causal:
                other &= cols[None, :] < rows[:, None]
            parts.append(attention_lse(
                q, k[:, :, cols], v[:, :, cols], key_mask[:, :, cols].unsqueeze(-2) & other, scale=self.scale,
                dropout_p=dropout_p))
        return merge_lse(parts)
