"""YOSO: attention by Bernoulli sampling with locality-sensitive hashing.

Paper: "You Only Sample (Almost) Once: Linear Cost Self-Attention Via Bernoulli Sampling", Zeng, Xiong, Ravi,
Acharya, Fung, Singh, ICML 2021, arXiv:2111.09714 (https://arxiv.org/abs/2111.09714); code:
https://github.com/mlpen/YOSO (also in Hugging Face transformers as ``YosoSelfAttention``).

With unit queries and keys, the softmax kernel is replaced by the collision probability of τ random hyperplane
hashes, ``B(Q, K)_ij = (1 - arccos(q̂_i·k̂_j)/π)^τ``, and the output is ``Y = B(Q, K) V``, normalised to unit length
per row (the released code's ``normalize(X)``; no softmax denominator). YOSO-E (``expectation=True``) computes
``B`` exactly, O(N²). YOSO samples it: m hashes of τ sign bits each (``h(x) = Σ_t 2^t [x·r_t > 0]`` with Gaussian
``r_t``) put every key into one of ``2^τ`` buckets per hash, and ``Y_i = (1/m) Σ_hashes Σ_{j: h(k_j) = h(q_i)} v_j`` is
read from per-bucket sums of the values: O(m·N·D), an unbiased estimate of ``B V`` that converges to it as m
grows.

Backward, as the paper and its code: the sampled forward is piecewise constant in q and k, so its gradient is not
used; both forms back-propagate the paper's estimator ``∂q̂_i = (τ/2) Σ_j B_ij (g_i·v_j) k̂_j``,
``∂k̂_j = (τ/2) Σ_i B_ij (g_i·v_j) q̂_i``, ``∂v_j = Σ_i B_ij g_i`` (the derivative of B replaced by ``(τ/2)·B``; the
normalisations of q, k and Y are differentiated by autograd). YOSO-E uses the exact B in it; YOSO samples B with
the forward's hashes (``lsh_backward=True``, linear cost: per-bucket sums of ``k̂ vᵀ`` and ``q̂ gᵀ``, O(m·N·D²)) or
uses the exact B (``lsh_backward=False``, the released code's ``n2_backward``). The gradient is therefore that of the
paper, not the gradient of the sampled function: a float64 gradcheck cannot pass by design.

Hashing: Gaussian hyperplanes drawn per head from ``seed`` (deterministic; ``rehash_each_forward=True`` draws new
ones at every training forward, as the released code does at every call); the released code's fast Hadamard
hashing (an approximation of the Gaussian projections) is not used. ``conv_window``: the released code's optional
depthwise convolution of the values along the sequence, added to the output (the paper's YOSO-C). Padding:
padded keys enter no bucket sum nor the convolution, and padded queries output zeros (but for the convolution).
Causal attention is refused: the paper defines none, and the bucket sums run over the whole sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_int, check_odd
from ..registry import register
from ._base import TokenMixer
from ._sparse_utils import SeededMixin, hash_normal, key_mask_of

__all__ = ['YosoAttention', 'collision_probability', 'lsh_cumulation']


def collision_probability(q: Tensor, k: Tensor, tau: int) -> Tensor:
    """``(1 - arccos(q·k)/π)^τ`` for unit ``q [..., N, D]`` and ``k [..., M, D]``: ``[..., N, M]``."""
    return (1 - torch.acos(torch.matmul(q, k.transpose(-1, -2)).clamp(-1., 1.)) / math.pi) ** tau


def lsh_cumulation(dst_codes: Tensor, src_codes: Tensor, values: Tensor, n_buckets: int,
                   weight: Tensor | None = None) -> Tensor:
    """``out_i = (1/m) Σ_r Σ_{j: src_r(j) = dst_r(i)} values_j``: bucket sums of ``values`` read at ``dst``'s buckets.

    One hash at a time: the values are added into a table of ``n_buckets`` rows per batch element and head, which
    the readers index: O(m·(N + M + n_buckets)·F) time, O((N + n_buckets)·F) extra memory. With ``weight``, each
    bucket sum is read as an ``[F / W, W]`` matrix and multiplied by the reader's weight vector (the paper's weighted
    cumulation of the backward), in chunks of readers so that the products stay small.

    Args:
        dst_codes: int64 [B, H, m, N] bucket of every reading token in each of the m hashes.
        src_codes: int64 [B, H, m, M] bucket of every summed token.
        values: [B, H, M, F] (zero rows for the tokens to leave out).
        n_buckets: buckets per hash.
        weight: [B, H, N, W] with W dividing F, or None.

    Returns:
        [B, H, N, F], or [B, H, N, F / W] with ``weight``.
    """
    B, H, m, M = src_codes.shape
    N, width = dst_codes.shape[-1], values.shape[-1]
    base = (torch.arange(B * H, device=values.device) * n_buckets).view(B, H, 1)  # the table rows of each (b, h)
    flat = values.reshape(B * H * M, width)
    rows = width if weight is None else width // weight.shape[-1]
    w = None if weight is None else weight.reshape(B * H * N, weight.shape[-1], 1)
    out = values.new_zeros([B * H * N, rows])
    step = max(1, (1 << 20) // max(1, width))  # readers per chunk of a weighted read
    for r in range(m):
        table = values.new_zeros([B * H * n_buckets, width]).index_put_(  # index_add_ is slower on long inputs
            ((src_codes[:, :, r] + base).flatten(),), flat, accumulate=True)
        dst = (dst_codes[:, :, r] + base).flatten()
        if w is None:
            out += table.index_select(0, dst)
        else:
            for i in range(0, B * H * N, step):
                block = table.index_select(0, dst[i:i + step]).view(-1, rows, w.shape[1])
                out[i:i + step] += torch.bmm(block, w[i:i + step]).squeeze(-1)
    return out.view(B, H, N, rows) / max(m, 1)


class _YosoCumulation(torch.autograd.Function):
    """``Y = B V`` (the exact ``B``, or sampled from the hash codes) with the paper's backward.

    ``mask [B, H, N]`` (1 = real token) hides padded tokens as queries and as keys; ``q_codes``, ``k_codes``
    ``[B, H, m, N]`` are the buckets of the queries and of the keys (None: the exact expectation).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, q_codes: Tensor | None, k_codes: Tensor | None,
                tau: int, n_buckets: int, lsh_backward: bool) -> Tensor:
        ctx.save_for_backward(q, k, v, mask, q_codes, k_codes)
        ctx.tau, ctx.n_buckets, ctx.lsh_backward = tau, n_buckets, lsh_backward
        if q_codes is not None and k_codes is not None:
            out = lsh_cumulation(q_codes, k_codes, v * mask.unsqueeze(-1), n_buckets)
            return out * mask.unsqueeze(-1)
        return torch.matmul(_masked_expectation(q, k, mask, tau), v)

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, mask, q_codes, k_codes = ctx.saved_tensors
        tau, n_buckets = ctx.tau, ctx.n_buckets
        if q_codes is not None and k_codes is not None and ctx.lsh_backward:
            g = grad * mask.unsqueeze(-1)
            kv = (k.unsqueeze(-1) * v.unsqueeze(-2) * mask[..., None, None]).flatten(-2)  # [B, H, N, D·Dv]
            qg = (q.unsqueeze(-1) * g.unsqueeze(-2)).flatten(-2)  # [B, H, N, D·Dv]
            grad_q = (tau / 2) * lsh_cumulation(q_codes, k_codes, kv, n_buckets, weight=g)  # Σ_j (k_j v_jᵀ) g_i
            grad_k = (tau / 2) * lsh_cumulation(k_codes, q_codes, qg, n_buckets, weight=v) * mask.unsqueeze(-1)
            grad_v = lsh_cumulation(k_codes, q_codes, g, n_buckets) * mask.unsqueeze(-1)
        else:
            e = _masked_expectation(q, k, mask, tau)  # [B, H, N, N]
            w = torch.matmul(grad, v.transpose(-1, -2)) * e
            grad_q = (tau / 2) * torch.matmul(w, k)
            grad_k = (tau / 2) * torch.matmul(w.transpose(-1, -2), q)
            grad_v = torch.matmul(e.transpose(-1, -2), grad)
        return grad_q, grad_k, grad_v, None, None, None, None, None, None


def _masked_expectation(q: Tensor, k: Tensor, mask: Tensor, tau: int) -> Tensor:
    return collision_probability(q, k, tau) * mask.unsqueeze(-1) * mask.unsqueeze(-2)


@register(
    'yoso', paper='You Only Sample (Almost) Once: Linear Cost Self-Attention Via Bernoulli Sampling',
    arxiv='2111.09714', year=2021, family='hashing', complexity='O(N·m·D)', kind='mixer',
)
class YosoAttention(SeededMixin, TokenMixer):
    """Attention weights sampled by LSH collisions (YOSO), or their expectation (YOSO-E).

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`). ``attn_drop`` drops the mixed values (there are no weights to drop).
        num_hash: m, hashes per forward (the released BERT and LRA configurations: 32).
        hash_code_len: τ, sign bits per hash, the exponent of the kernel (the released BERT configuration: 9;
            LRA: 10 to 12); ``2^τ`` buckets per hash.
        expectation: YOSO-E, the exact expectation ``B(Q, K)`` (O(N²)) instead of the sampled estimate.
        lsh_backward: back-propagate the sampled estimator (linear cost); False uses the exact ``B`` in the
            backward (O(N²), the released ``n2_backward``). Not used with ``expectation=True``.
        conv_window: odd kernel length of the released code's depthwise convolution of the values (None: none).
        seed: seed of the hyperplanes (default None: drawn from torch's generator at construction; kept in the
            state dict, see `SeededMixin`).
        rehash_each_forward: draw new hyperplanes at every training forward (the released code's behaviour); the
            default uses those of ``seed``, so that the module is a deterministic function.
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
            num_hash: int = 32,
            hash_code_len: int = 9,
            expectation: bool = False,
            lsh_backward: bool = True,
            conv_window: int | None = None,
            seed: int | None = None,
            rehash_each_forward: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        self.num_hash = check_int('num_hash', num_hash)
        self.hash_code_len = check_int('hash_code_len', hash_code_len, 1, 16)
        self.expectation = expectation
        self.lsh_backward = lsh_backward
        self.conv = None
        if conv_window is not None:
            check_odd('conv_window', conv_window)
            self.conv = nn.Conv2d(num_heads, num_heads, (conv_window, 1), padding=(conv_window // 2, 0),
                                  groups=num_heads, bias=False, device=device, dtype=dtype)
        self.init_seed(seed)
        self.rehash_each_forward = rehash_each_forward

    def hyperplanes(self, like: Tensor) -> Tensor:
        """The random hyperplanes ``[H, D, m·τ]`` (in ``like``'s dtype and device)."""
        shape = [self.num_heads, self.head_dim, self.num_hash * self.hash_code_len]
        if self.rehash_each_forward and self.training:
            return torch.randn(shape, device=like.device, dtype=like.dtype)
        return hash_normal(self.seed, shape).to(like.device, like.dtype)

    def hash_codes(self, x: Tensor) -> Tensor:
        """Bucket ids ``[B, H, m, N]`` (int64 in ``[0, 2^τ)``) of ``x [B, H, N, D]`` under `hyperplanes`."""
        B, H, N, _ = x.shape
        m, tau = self.num_hash, self.hash_code_len
        planes = self.hyperplanes(x)  # [H, D, m·τ]
        powers = (2 ** torch.arange(tau, device=x.device)).to(x.dtype)  # exact: τ <= 16 bits
        step = max(1, (1 << 22) // max(1, B * H * m * tau))  # tokens per projection: a bounded transient
        codes: list[Tensor] = []
        for i in range(0, N, step):
            bits = torch.matmul(x[:, :, i:i + step], planes) > 0  # [B, H, c, m·τ]
            codes.append(torch.matmul(bits.unflatten(-1, (m, tau)).to(x.dtype), powers).long())  # [B, H, c, m]
        if len(codes) == 0:
            return torch.zeros(B, H, m, N, dtype=torch.long, device=x.device)
        return torch.cat(codes, dim=2).transpose(-1, -2)

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        dtype = torch.promote_types(q.dtype, torch.float32)
        real = key_mask_of(key_padding_mask, q).to(dtype).expand(q.shape[0], q.shape[1], q.shape[2])  # [B, H, N]
        qn, kn = F.normalize(q.to(dtype), dim=-1), F.normalize(k.to(dtype), dim=-1)
        vf = v.to(dtype)
        q_codes: Tensor | None = None
        k_codes: Tensor | None = None
        if not self.expectation:
            with torch.no_grad():  # one set of hyperplanes for the queries and the keys
                q_codes, k_codes = self.hash_codes(qn), self.hash_codes(kn)
        y = _YosoCumulation.apply(qn, kn, vf, real, q_codes, k_codes, self.hash_code_len, 2 ** self.hash_code_len,
                                  self.lsh_backward)
        out = F.normalize(y, dim=-1)
        if self.conv is not None:
            out = out + self.conv(v * real.unsqueeze(-1).to(v.dtype)).to(dtype)
        return self.attn_drop(out).to(v.dtype)
