"""Reformer's LSH attention.

Paper: "Reformer: The Efficient Transformer", Kitaev, Kaiser, Levskaya, ICLR 2020, arXiv:2001.04451
(https://arxiv.org/abs/2001.04451).

Shared-QK attention: the keys are the unit-normalised queries (the ``k`` third of ``qkv`` is kept, so a
pretrained ViT's weights load, but unused). Angular LSH hashes each key into one of ``n_buckets`` buckets,
``h(x) = argmax([xR; -xR])`` with a random rotation R per hash round; tokens are sorted by (bucket, position),
cut into chunks of ``bucket_size`` and each chunk attends to itself and the previous chunk (the first chunk to
the last). A token attends to itself only when it has nothing else to attend to (its score is set to ``-5e4``,
the paper's rule). Causal: the chunk is replaced by a look-back over the ``bucket_size`` previous tokens of the
same bucket in sorted order, so that what token t sees depends on tokens up to t only.

Several hash rounds (``n_hashes``), and ``rounds=``:

- ``'separate'`` (default): the paper's multi-round LSH attention. Section 2 ("Multi-round LSH attention",
  eq. 6) defines ``P_i = ∪_r P_i^(r)`` with ``P_i^(r) = {j : h^(r)(q_i) = h^(r)(q_j)}`` and says that the
  multi-round case "essentially involves performing LSH attention n_rounds times in parallel"; Appendix A
  (eqs. 7-8) writes it out: each round sorts by its own hash, ``s^(r)``, and attends within its own chunks,
  ``P̃_i^(r) = {j : ⌊s_i^(r)/m⌋ - 1 <= ⌊s_j^(r)/m⌋ <= ⌊s_i^(r)/m⌋}``, giving ``o_i^(r)`` with normaliser
  ``z(i, P_i^(r))``, and the rounds combine as ``o_i = Σ_r exp(z(i, P_i^(r)) - z(i, P_i)) o_i^(r)``: a
  log-sum-exp weighting of the rounds, computed here with `merge_lse`. Two details of the appendix are not
  followed (as in reformer-pytorch's defaults ``attend_across_buckets=True``, ``allow_duplicate_attention=True``):
  keys of another bucket inside the chunk window are attended, not masked by ``m(j, P_i^(r)) = ∞``, and a key
  found by several rounds counts once per round (the appendix subtracts ``log N_{i,j}``, ``N_{i,j}`` = the
  rounds in which i sees j).
- ``'joint'``: the released code's layout (trax, and reformer-pytorch which follows it): the ``n_hashes``
  sorted rounds are laid end to end as one sequence of ``n_hashes·N`` tokens (round r's buckets after round
  r-1's), cut into chunks of ``bucket_size`` across it, and each chunk looks one chunk back across round
  boundaries (the first chunk of round r sees the last chunk of round r-1, the very first the very last; a
  chunk may straddle two rounds when ``bucket_size`` does not divide N). The per-round outputs combine as above.
  Only the chunked (non-causal) form differs: the causal look-back is bucket-tagged and buckets of different
  rounds never share a tag, so both settings compute the same causal attention.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_int
from ..registry import register
from ._base import TokenMixer
from ._sparse_utils import (
    SeededMixin,
    attention_lse,
    gather_rows,
    hash_normal,
    key_mask_of,
    look_back,
    merge_lse,
    pad_to_multiple,
    window_attention_lse,
)

__all__ = ['ReformerAttention']

SELF_SCORE = -5e4


@register(
    'reformer', paper='Reformer: The Efficient Transformer', arxiv='2001.04451', year=2020, family='hashing',
    complexity='O(N·log N)', kind='mixer', supports_causal=True,
)
class ReformerAttention(SeededMixin, TokenMixer):
    """LSH attention with shared queries and keys.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer: as timm's
            ``Attention`` (see `TokenMixer`).
        bucket_size: chunk length (the paper: 64); also sets the default number of buckets.
        n_hashes: hash rounds (the paper: 1 to 8; more rounds, closer to full attention).
        n_buckets: buckets per round (default ``N / bucket_size`` rounded up to an even number; 1 = no hashing).
        seed: seed of the random rotations (default None: drawn from torch's generator at construction, so every
            layer differs; kept in the state dict, see `SeededMixin`).
        rehash_each_forward: draw new rotations at every training forward (the paper); the default uses rotations
            drawn from ``seed``, so that the module is a deterministic function.
        rounds: ``'separate'`` (each round chunks its own sorted sequence, the paper) or ``'joint'`` (the rounds
            sorted as one sequence whose chunks look back across round boundaries, trax and reformer-pytorch);
            see the module docstring.
        device, dtype: factory arguments.

    Shapes:
        x: [B, N, C] -> [B, N, C]; ``attn_mask``: [B, N] bool key padding (True = real token).
    """

    __constants__ = TokenMixer.__constants__ + ['self_score']
    supports_key_padding = True
    supports_causal = True
    self_score = SELF_SCORE

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
            bucket_size: int = 64,
            n_hashes: int = 4,
            n_buckets: int | None = None,
            seed: int | None = None,
            rehash_each_forward: bool = False,
            rounds: str = 'separate',
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype)
        self.bucket_size = check_int('bucket_size', bucket_size)
        self.n_hashes = check_int('n_hashes', n_hashes)
        if n_buckets is not None:
            check_int('n_buckets', n_buckets)
            if n_buckets > 1 and n_buckets % 2:
                raise ValueError(f'n_buckets must be 1 or even (angular LSH), got {n_buckets}')
        self.n_buckets = n_buckets
        self.init_seed(seed)
        self.rehash_each_forward = rehash_each_forward
        if rounds not in ('separate', 'joint'):
            raise ValueError(f"rounds must be 'separate' or 'joint', got {rounds!r}")
        self.rounds = rounds

    def buckets_for(self, seq_len: int) -> int:
        """Buckets per hash round for a sequence of ``seq_len`` tokens."""
        if self.n_buckets is not None:
            return self.n_buckets
        n = -(-seq_len // self.bucket_size)
        return 1 if n <= 1 else n + n % 2

    def hash(self, keys: Tensor) -> Tensor:
        """Angular LSH of ``keys [B, H, N, D]`` -> bucket ids ``[B, H, n_hashes, N]``."""
        B, H, N, D = keys.shape
        nb = self.buckets_for(N)
        if nb == 1:
            return torch.zeros(B, H, self.n_hashes, N, dtype=torch.long, device=keys.device)
        shape = [D, self.n_hashes, nb // 2]
        if self.rehash_each_forward and self.training:
            rot = torch.randn(shape, device=keys.device, dtype=keys.dtype)
        else:
            rot = hash_normal(self.seed, shape).to(keys.device, keys.dtype)
        proj = torch.einsum('bhnd,drk->bhrnk', keys, rot)  # argmax of [xR; -xR] without forming it
        hi, lo = proj.max(dim=-1), proj.min(dim=-1)
        return torch.where(hi.values >= -lo.values, hi.indices, lo.indices + nb // 2)

    def attend(
            self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
            is_causal: bool,
    ) -> Tensor:
        B, H, N, D = q.shape
        R, c = self.n_hashes, self.bucket_size
        keys = F.normalize(q, dim=-1)
        key_mask = key_mask_of(key_padding_mask, q).unsqueeze(2)  # [B, 1, 1, N]
        # padded tokens go to a bucket of their own, sorted last: the real tokens' order does not depend on them
        buckets = self.hash(keys.detach()).masked_fill(~key_mask, self.buckets_for(N))  # [B, H, R, N]
        pos = torch.arange(N, device=q.device)
        order = (buckets * N + pos).argsort(dim=-1)  # [B, H, R, N]: sorted by bucket, then position
        qs = gather_rows(q.unsqueeze(2), order)  # [B, H, R, N, D]
        ks = gather_rows(keys.unsqueeze(2), order)
        vs = gather_rows(v.unsqueeze(2), order)
        kms = torch.gather(key_mask.expand(B, H, R, N), -1, order)
        dropout_p = self.attn_drop.p if self.training else 0.
        if is_causal:
            out, lse = window_attention_lse(
                qs, ks, vs, window=c, causal=True, key_mask=kms, scale=self.scale,
                tags=torch.gather(buckets, -1, order), self_score=self.self_score, dropout_p=dropout_p)
        else:
            ps, kmr = order, kms
            if self.rounds == 'joint' and R > 1:  # the rounds end to end: [B, H, 1, R·N(, D)]
                qs, ks, vs = qs.flatten(2, 3).unsqueeze(2), ks.flatten(2, 3).unsqueeze(2), vs.flatten(2, 3).unsqueeze(2)
                ps, kmr = order.flatten(2).unsqueeze(2), kms.flatten(2).unsqueeze(2)
            L = qs.shape[-2]
            nc = -(-L // c)
            qc = pad_to_multiple(qs, c, -2).unflatten(-2, (nc, c))  # [..., nc, c, D]
            kc = pad_to_multiple(ks, c, -2).unflatten(-2, (nc, c))
            vc = pad_to_multiple(vs, c, -2).unflatten(-2, (nc, c))
            ps = pad_to_multiple(ps, c, -1, -1.).unflatten(-1, (nc, c))
            kpos = look_back(ps, -2)
            mask = look_back(pad_to_multiple(kmr, c, -1, 0.).unflatten(-1, (nc, c)), -2).unsqueeze(-2)
            itself = ps.unsqueeze(-1) == kpos.unsqueeze(-2)  # [..., nc, c, 2c]
            out, lse = attention_lse(
                qc, look_back(kc, -3), look_back(vc, -3), mask, scale=self.scale,
                fill=(itself, self.self_score), dropout_p=dropout_p)
            out, lse = out.flatten(-3, -2)[..., :L, :], lse.flatten(-2)[..., :L]
            out, lse = out.reshape(B, H, R, N, out.shape[-1]), lse.reshape(B, H, R, N)
        inv = order.argsort(dim=-1)
        out = gather_rows(out, inv)
        lse = torch.gather(lse, -1, inv)
        return merge_lse([(out[:, :, r], lse[:, :, r]) for r in range(R)])
