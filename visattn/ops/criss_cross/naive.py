"""PyTorch path of criss-cross attention: the spec, and the CPU path.

Position (y, x) attends to the Hs keys of its column and the Ws - 1 other keys of its row, in one softmax
over Hs + Ws - 1 logits (the position itself counted once, in the column). Memory O(Hs·Ws·(Hs + Ws)),
written with two einsums as CCNet's released code does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._utils import masked_softmax_fp32
from .._dispatch import upcast


def criss_cross_attention_naive(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Criss-cross attention.

    Args:
        q, k: [B, H, Hs, Ws, Dk].
        v: [B, H, Hs, Ws, Dv].
        scale: factor on q·k (default 1/sqrt(Dk)).

    Returns:
        [B, H, Hs, Ws, Dv] in ``q``'s dtype (float32 accumulation).
    """
    hs, ws, dk = q.shape[2], q.shape[3], q.shape[4]
    scale = dk ** -0.5 if scale is None else scale
    qf, kf, vf = upcast(q) * scale, upcast(k), upcast(v)
    col = torch.einsum('bhyxd,bhzxd->bhyxz', qf, kf)  # [B, H, Hs, Ws, Hs]: keys (z, x)
    row = torch.einsum('bhyxd,bhyud->bhyxu', qf, kf)  # [B, H, Hs, Ws, Ws]: keys (y, u)
    not_self = ~torch.eye(ws, dtype=torch.bool, device=q.device)  # [Ws(x), Ws(u)]: the row leaves (y, x) out
    mask = torch.cat([torch.ones(ws, hs, dtype=torch.bool, device=q.device), not_self], -1)  # [Ws, Hs + Ws]
    p = masked_softmax_fp32(torch.cat([col, row], -1), mask)
    out = torch.einsum('bhyxz,bhzxd->bhyxd', p[..., :hs], vf) + torch.einsum('bhyxu,bhyud->bhyxd', p[..., hs:], vf)
    return out.to(q.dtype)
