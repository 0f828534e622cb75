"""The spec of 2-D neighbourhood attention in plain PyTorch (the op's PyTorch path is `torch_blocked`).

Each query attends to a ``kernel_size × kernel_size`` neighbourhood of keys (every ``dilation``-th position).
Borders as NATTEN: along each axis the window keeps its full size and shifts to stay inside the map, so
every query sees exactly k×k keys. With dilation d, positions of one residue class ``i mod d`` form a
sub-grid and the window lives in it. The loop runs over the k² window offsets (never over positions): each
step gathers one key per query, so the memory is O(Hs·Ws·(D + k²)) without autograd; with it, every gathered
key and value is kept for the backward (O(Hs·Ws·k²·D)), and the backward of the advanced indexing is a slow
scatter-add: `neighborhood_attention_2d_blocked` computes the same function by batched matmuls.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._utils import softmax_fp32
from .._dispatch import upcast


def window_index(length: int, kernel_size: int, dilation: int, device=None) -> Tensor:
    """Key positions of each query's window along one axis: [length, kernel_size] (NATTEN's borders).

    Query i lies in the residue class ``r = i mod d`` of ``g = ceil((length - r) / d)`` positions, at index
    ``i // d`` in it; its window starts at ``clamp(i // d - k // 2, 0, g - k)`` in the class.
    """
    i = torch.arange(length, device=device)
    r = i % dilation
    g = (length - r + dilation - 1) // dilation
    start = torch.minimum((i // dilation - kernel_size // 2).clamp(min=0), g - kernel_size)
    return r[:, None] + dilation * (start[:, None] + torch.arange(kernel_size, device=device))


def neighborhood_attention_2d_naive(q: Tensor, k: Tensor, v: Tensor, kernel_size: int, dilation: int = 1,
                                    rpb: Tensor | None = None, scale: float | None = None) -> Tensor:
    """k×k neighbourhood attention with an optional relative position bias.

    Args:
        q, k: [B, H, Hs, Ws, Dk].
        v: [B, H, Hs, Ws, Dv].
        kernel_size: odd window size k.
        dilation: step between window positions.
        rpb: [H, 2k-1, 2k-1] bias indexed by ``(key - query) / dilation + k - 1`` along each axis, or None.
        scale: factor on q·k (default 1/sqrt(Dk)).

    Returns:
        [B, H, Hs, Ws, Dv] in ``q``'s dtype (float32 accumulation).
    """
    hs, ws, dk = q.shape[2], q.shape[3], q.shape[4]
    scale = dk ** -0.5 if scale is None else scale
    iy = window_index(hs, kernel_size, dilation, q.device)  # [Hs, k]
    ix = window_index(ws, kernel_size, dilation, q.device)  # [Ws, k]
    qf, kf, vf = upcast(q) * scale, upcast(k), upcast(v)
    offsets = [(a, b) for a in range(kernel_size) for b in range(kernel_size)]
    # one gathered key per query and offset: [B, H, Hs, Ws, D] each
    logits = torch.stack([(qf * kf[:, :, iy[:, a, None], ix[None, :, b]]).sum(-1) for a, b in offsets], -1)
    if rpb is not None:
        ry = (iy - torch.arange(hs, device=q.device)[:, None]) // dilation + kernel_size - 1  # [Hs, k]
        rx = (ix - torch.arange(ws, device=q.device)[:, None]) // dilation + kernel_size - 1  # [Ws, k]
        bias = rpb[:, ry[:, None, :, None], rx[None, :, None, :]]  # [H, Hs, Ws, k, k]
        logits = logits + upcast(bias).flatten(-2)
    p = softmax_fp32(logits, dim=-1)
    out = sum(p[..., t, None] * vf[:, :, iy[:, a, None], ix[None, :, b]] for t, (a, b) in enumerate(offsets))
    return out.to(q.dtype)
