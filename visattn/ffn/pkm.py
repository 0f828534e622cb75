"""Product-key memory (PKM) in a ViT's feed-forward slot.

Paper: "Large Memory Layers with Product Keys", Lample, Sablayrolles, Ranzato, Denoyer, Jégou, NeurIPS 2019,
arXiv:1907.05242 (https://arxiv.org/abs/1907.05242). Released code: facebookresearch/XLM (``xlm/model/memory/``
and the minimal ``PKM-layer.ipynb``).

A key-value memory of ``M = n²`` slots read sparsely. For each token ``x ∈ R^C`` and each head ``h = 1..H``:

    q_h = BN(W_q x + b_q)_h ∈ R^{d_q},            q_h = [q¹_h, q²_h]  (halves of d_q / 2)
    s¹_h[a] = q¹_h · c¹_{h,a},  s²_h[b] = q²_h · c²_{h,b},   a, b ∈ 0..n-1  (two sub-key sets of n keys per head)
    I_h = T_k(s¹_h) × T_k(s²_h)                     (the k² pairs of the top-k of each half)
    S_h = T_k over (a, b) ∈ I_h of s¹_h[a] + s²_h[b]
    w_h = softmax over (a, b) ∈ S_h of s¹_h[a] + s²_h[b]
    m(x) = Σ_h Σ_{(a, b) ∈ S_h} w_h[a, b] · v_{a·n + b}

The key of slot ``(a, b)`` is the concatenation ``[c¹_{h,a}, c²_{h,b}]``, so its score is ``s¹_h[a] + s²_h[b]``, and
``S_h`` is exactly the top-k of all ``n²`` slot scores (the paper's claim): if ``a`` is not among the top-k of
``s¹_h``, the k slots ``(a', b)`` with ``a'`` among them all score at least as high as ``(a, b)``, and likewise for
``b``, so every slot of the full top-k lies in ``I_h`` (ties aside). The cost per token and head is
``O(n·d_q + k²)`` instead of ``O(n²·d_q)``. The values, one table of ``M × out_features`` shared by the heads, are
read with ``nn.EmbeddingBag(mode='sum')`` and the softmax weights as ``per_sample_weights``, as the released code
does; the heads are summed. Gradients reach the query network and the selected keys through the selected scores, and the
selected values; the choice of slots is piecewise constant.

Choices, and where the paper and the released code differ:
- Query network: one linear ``C -> H·d_q`` with bias (``--mem_query_layer_sizes 0,0``, the released default),
  then BatchNorm over the ``H·d_q`` query features. The paper adds the batch normalisation to spread the queries
  over the keys (better key usage); the released command line defaults it off (``--mem_query_batchnorm false``),
  its minimal notebook's configuration on. Default on (``query_norm=True``); ``query_norm=False`` is the released
  default. Its statistics are taken over every token of the batch (``[B·N, H·d_q]``).
- ``k_dim`` (the query and key size ``d_q``) = 256, the released default (its notebook's example: 128);
  ``heads`` = 4 and ``topk`` = 32, the paper's and the released defaults.
- Memory size: the paper's ``n_keys = 512`` gives 262,144 slots, a table of 262,144 × C values (100M parameters
  at C = 384) meant for one or two layers of a network. ``mlp_layer=`` puts the layer in every block, so the
  default here is ``n_keys = 64`` (4,096 slots: at C = 384, 1.6M values + 0.4M query weights per block, close to
  the 1.2M of a ViT's ``Mlp``). Pass ``n_keys=512`` for the paper's memory, e.g. in one block
  (``model.blocks[i].mlp = visattn.create_ffn('pkm', C, n_keys=512)``).
- Keys: separate sub-keys for every head (``--mem_use_different_keys true``), learned, initialised as the released
  code, uniform in ``±1/√(d_q/2)`` (drawn from torch's generator; the released code seeds NumPy per head and half).
  Values initialised ``N(0, out_features^-1)`` (std ``out_features^-1/2``) as the released code. In a timm ViT,
  ``init_weights`` re-initialises the query linear as every ``nn.Linear`` (truncated normal, std 0.02); the keys and
  values keep theirs.
- Scores: the softmax over the k selected (the paper's; the released code's temperature, subtraction and L1
  options and its input dropout are not offered).
- The released notebook recommends learning the values, which get sparse updates, with their own Adam at a
  constant learning rate of 1e-3: ``sparse=True`` gives ``nn.EmbeddingBag`` sparse gradients (off by default, as
  ``--mem_sparse``); the value table is ``[p for n, p in model.named_parameters() if
  n.endswith('values.weight')]``.

timm ``Mlp``'s arguments: ``hidden_features`` and ``act_layer`` are accepted and unused (the memory has no hidden
layer and no activation; its width is the memory size); ``norm_layer`` (timm's ``scale_mlp_norm``), when given,
normalises the memory read-out before the output dropout; ``bias`` is the query linear's bias (the first of a pair);
``drop`` (or a pair) is the dropout on the query (the released ``query_dropout``) and on the output (its
``value_dropout``).

Numerics: the scores, the top-k choices and the softmax run in ``promote_types(dtype, float32)`` (16-bit inputs
choose their slots in float32; float64 stays float64); the value read runs in the value table's dtype (a 16-bit
table is read by ``EmbeddingBag`` as it is rather than copied to float32 at every call: the table is the large part
of the layer), and the result is cast to the input's dtype. The query linear runs in the module's dtype, as timm's
``Mlp``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_int
from ..registry import register
from ._base import check_features, feature_pair, optional_features

__all__ = ['ProductKeyMemory']


@register(
    'pkm', paper='Large Memory Layers with Product Keys', arxiv='1907.05242', year=2019, family='memory',
    complexity='O(N·H·(√M·d_q + k²))', kind='ffn',
)
class ProductKeyMemory(nn.Module):
    """Product-key memory layer: ``[..., in_features] -> [..., out_features]``; usable as timm ViT's ``mlp_layer=``.

    Args:
        in_features: channels C of the tokens.
        hidden_features: accepted for timm's ``Block`` and unused (see the module docstring).
        out_features: size of the values and of the output (default ``in_features``).
        act_layer: accepted and unused.
        norm_layer: norm of the read-out (``[..., out_features]``); None for none.
        bias: bias of the query linear (a pair: its first entry).
        drop: dropout on the queries and on the output (a pair: one each).
        heads: memory heads H (summed).
        topk: slots read per head, k (at most ``n_keys``).
        n_keys: sub-keys per half, n; the memory has ``n_keys²`` slots.
        k_dim: size d_q of the queries and keys (even; each sub-key has ``k_dim / 2``).
        query_norm: BatchNorm on the queries (the paper's); False for the released code's default.
        sparse: sparse gradients for the value table (``nn.EmbeddingBag(sparse=True)``).
        device, dtype: factory arguments.

    Shapes:
        x: [..., in_features] -> [..., out_features].
    """

    def __init__(
            self,
            in_features: int,
            hidden_features: int | None = None,
            out_features: int | None = None,
            act_layer: type[nn.Module] | str | None = nn.GELU,
            norm_layer: type[nn.Module] | None = None,
            bias: bool | tuple[bool, bool] = True,
            drop: float | tuple[float, float] = 0.,
            *,
            heads: int = 4,
            topk: int = 32,
            n_keys: int = 64,
            k_dim: int = 256,
            query_norm: bool = True,
            sparse: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.in_features = check_int('in_features', in_features)
        optional_features('hidden_features', hidden_features, in_features)
        self.out_features = optional_features('out_features', out_features, in_features)
        self.heads = check_int('heads', heads)
        self.n_keys = check_int('n_keys', n_keys)
        self.topk = check_int('topk', topk)
        if topk > n_keys:
            raise ValueError(f'topk must be an int in [1, n_keys={n_keys}] (k keys are taken from each half), '
                             f'got {topk!r}')
        self.k_dim = check_int('k_dim', k_dim, minimum=2)
        if k_dim % 2:
            raise ValueError(f'k_dim must be even (two halves of k_dim / 2), got {k_dim!r}')
        bias_pair = feature_pair('bias', bias)
        drop_pair = feature_pair('drop', drop)

        self.query = nn.Linear(in_features, heads * k_dim, bias=bias_pair[0], **dd)
        self.query_norm = nn.BatchNorm1d(heads * k_dim, **dd) if query_norm else nn.Identity()
        self.query_drop = nn.Dropout(drop_pair[0])
        self.keys = nn.Parameter(torch.empty(heads, 2, n_keys, k_dim // 2, **dd))  # [H, half, n, d_q / 2]
        self.values = nn.EmbeddingBag(n_keys * n_keys, self.out_features, mode='sum', sparse=sparse, **dd)
        self.norm = norm_layer(self.out_features, **dd) if norm_layer is not None else nn.Identity()
        self.drop = nn.Dropout(drop_pair[1])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The released code's initialisation of the keys and values (the query linear keeps PyTorch's)."""
        bound = 1 / math.sqrt(self.k_dim // 2)
        nn.init.uniform_(self.keys, -bound, bound)
        nn.init.normal_(self.values.weight, std=self.out_features ** -0.5)

    @property
    def memory_size(self) -> int:
        """The number of memory slots, ``n_keys²``."""
        return self.n_keys * self.n_keys

    def lookup(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """The top-``topk`` slots of each head by product keys.

        Args:
            q: [R, H·d_q] queries (after the query network).

        Returns:
            ``(scores, slots)``: [R, H, k] the slot scores ``q_h · key`` in ``promote_types(q.dtype, float32)``,
            sorted in decreasing order, and [R, H, k] the slot indices ``a·n + b`` (int64).
        """
        R, H, k, n = q.shape[0], self.heads, self.topk, self.n_keys
        q = q.to(torch.promote_types(q.dtype, torch.float32)).reshape(R, H, 2, self.k_dim // 2)
        s = torch.einsum('rhjd,hjnd->rhjn', q, self.keys.to(q.dtype))  # [R, H, 2, n] sub-key scores
        top, idx = s.topk(k, dim=-1)  # [R, H, 2, k] each half's best
        pairs = (top[:, :, 0, :, None] + top[:, :, 1, None, :]).reshape(R, H, k * k)  # [R, H, k²] candidates
        scores, best = pairs.topk(k, dim=-1)  # [R, H, k]
        first = idx[:, :, 0].gather(-1, torch.div(best, k, rounding_mode='floor'))
        second = idx[:, :, 1].gather(-1, torch.remainder(best, k))
        return scores, first * n + second

    def forward(self, x: Tensor) -> Tensor:
        check_features(x, self.in_features, 'ProductKeyMemory')
        rows = x.reshape(-1, self.in_features)  # [R, C], R = every leading position
        q = self.query_drop(self.query_norm(self.query(rows)))  # [R, H·d_q]
        scores, slots = self.lookup(q)
        weights = torch.softmax(scores, dim=-1)  # [R, H, k]
        table = self.values.weight
        out = self.values(slots.flatten(1), per_sample_weights=weights.flatten(1).to(table.dtype))  # [R, out]
        out = self.drop(self.norm(out.to(x.dtype)))
        return out.reshape(list(x.shape[:-1]) + [self.out_features])
