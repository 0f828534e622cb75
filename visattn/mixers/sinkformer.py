"""Sinkformer: attention with doubly stochastic weights.

Paper: "Sinkformers: Transformers with Doubly Stochastic Attention", Sander, Ablin, Blondel, Peyré, AISTATS 2022,
arXiv:2110.11773 (https://arxiv.org/abs/2110.11773); code: https://github.com/michaelsdr/sinkformers.

The softmax, which normalises the rows of ``K⁰ = exp(QKᵀ/sqrt(d))``, is replaced by Sinkhorn's algorithm: the
rows and the columns are normalised alternately, ``K^{l+1} = K^l / (K^l 1) (1ᵀ)`` for even l and
``K^{l+1} = K^l / (1 1ᵀ K^l)`` for odd l, so that one iteration is exactly the softmax and more iterations
converge to a doubly stochastic matrix. As in the released code the iterations are unrolled (in log space) and
autograd differentiates through them; after an even number of iterations the last step is a column
normalisation, so the rows sum to 1 only approximately. Default ``n_iter=3``, the released ViT experiments'
default (the paper compares 1 iteration, the Transformer, with more).

Padding: a padded token is removed from the kernel both as a key (column) and as a query (row), so the real
tokens form an ``n x n`` kernel that is balanced on its own and no padded token reaches a real output; padded
tokens output zeros. Causal attention is refused: the column normalisation divides every weight of column j by
a sum over all the queries, later ones included, so a causal mask on the kernel would still leak the future.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_int
from ..registry import register
from ._base import TokenMixer
from ._sparse_utils import key_mask_of

__all__ = ['SinkformerAttention', 'masked_sinkhorn']


def masked_sinkhorn(logits: Tensor, mask: Tensor | None, n_iter: int) -> Tensor:
    """``n_iter`` alternate row / column normalisations (rows first) of ``exp(logits)`` in log space.

    Args:
        logits: [..., N, M] scores (at least float32).
        mask: bool broadcastable to [..., N, M], True = the pair is in the kernel (None: every pair).
        n_iter: iterations (1 = softmax over the rows).

    Returns:
        [..., N, M] weights; pairs outside the mask, and rows or columns without any pair, are 0.
    """
    masked = -1e30  # MASKED of _sparse_utils (TorchScript reads no module-level number)
    log_k = logits if mask is None else logits.masked_fill(~mask, masked)
    for it in range(n_iter):
        log_k = log_k - torch.logsumexp(log_k, dim=-1 if it % 2 == 0 else -2, keepdim=True)
        if mask is not None:  # keep the hidden pairs at MASKED: an empty row or column stays empty
            log_k = log_k.masked_fill(~mask, masked)
    out = log_k.exp()
    return out if mask is None else out.masked_fill(~mask, 0.)


@register(
    'sinkformer', paper='Sinkformers: Transformers with Doubly Stochastic Attention', arxiv='2110.11773',
    year=2021, family='softmax', complexity='O(N²·n_iter)', kind='mixer',
)
class SinkformerAttention(TokenMixer):
    """Full attention whose weights are balanced by ``n_iter`` Sinkhorn iterations instead of one softmax.

    Family ``softmax``: it is full dot-product attention with a different normaliser (``n_iter=1`` is exactly
    softmax attention); the ``sorting`` family's Sinkhorn (Sparse Sinkhorn Attention) sorts blocks instead.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`).
        n_iter: Sinkhorn iterations (1 = the softmax Transformer; the released ViT experiments: 3).
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
            n_iter: int = 3,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        self.n_iter = check_int('n_iter', n_iter)

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        s = torch.matmul(q, k.transpose(-1, -2))
        s = s.to(torch.promote_types(s.dtype, torch.float32)) * self.scale
        mask: Tensor | None = None
        if key_padding_mask is not None:
            real = key_mask_of(key_padding_mask, q)  # [B, 1, N]
            mask = real.unsqueeze(-1) & real.unsqueeze(-2)  # [B, 1, N, N]: real queries x real keys
        p = masked_sinkhorn(s, mask, self.n_iter)
        if self.training and self.attn_drop.p > 0.:
            p = F.dropout(p, self.attn_drop.p, True)
        return torch.matmul(p.to(v.dtype), v)
