"""Pattern helpers shared by the sparse, hashing, clustering and compressed mixers.

Everything works on ``[..., N, D]`` tensors (leading dims are batch and heads, plus any grouping such as
hash rounds or dilation residues) and never forms an ``N x N`` matrix for a local pattern: the sliding
window is computed block by block against a band of keys (``unfold`` views), block-sparse patterns gather
whole key blocks. Each attention piece returns its output together with the log-sum-exp of its scores,
so that pieces over disjoint key sets (window, global tokens, random blocks, hash rounds) combine into one
exact softmax with `merge_lse`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_int

# Score of a masked pair, and log-sum-exp of a row that sees no key: finite, so that no NaN can appear in
# the forward or backward pass; a row that sees nothing outputs zeros. The scripted helpers spell them as
# literals (TorchScript reads no module-level number); tests/mixers check that the two agree.
MASKED = -1e30
EMPTY_LSE = -1e30

__all__ = [
    'MASKED', 'EMPTY_LSE', 'attention_lse', 'merge_lse', 'window_attention_lse',
    'gather_rows', 'scatter_rows', 'split_residues', 'merge_residues', 'ceil_log', 'pad_to_multiple',
    'look_back', 'key_mask_of', 'hash_bits', 'hash_uniform', 'hash_normal', 'SeededMixin',
]


def attention_lse(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        scale: float,
        bias: Tensor | None = None,
        fill: tuple[Tensor, float] | None = None,
        dropout_p: float = 0.,
) -> tuple[Tensor, Tensor]:
    """Softmax attention of ``q`` over ``k``/``v`` with the log-sum-exp of every row.

    The scores and the softmax are computed in at least float32; a row whose keys are all masked gives zeros.

    Args:
        q: [..., n, D] queries.
        k: [..., m, D] keys.
        v: [..., m, Dv] values.
        mask: bool, broadcastable to [..., n, m]; True = attend (None: every key).
        scale: multiplier of ``q·k``.
        bias: float added to the scores, broadcastable to [..., n, m].
        fill: ``(where, score)``: the scores where the bool ``where`` (broadcastable) is True become ``score``.
        dropout_p: dropout probability on the normalised weights, applied when > 0 (pass 0 outside training).

    Returns:
        ``(out [..., n, Dv] in v's dtype, lse [..., n] in at least float32)``.
    """
    masked, empty_lse = -1e30, -1e30  # MASKED, EMPTY_LSE
    s = torch.matmul(q, k.transpose(-1, -2))
    s = s.to(torch.promote_types(s.dtype, torch.float32)).mul_(scale)  # a fresh tensor: updated in place below
    if bias is not None:
        s = s.add_(bias) if torch.broadcast_shapes(bias.shape, s.shape) == s.shape else s + bias
    if fill is not None:
        s = s.masked_fill_(fill[0], fill[1]) if torch.broadcast_shapes(fill[0].shape, s.shape) == s.shape \
            else s.masked_fill(fill[0], fill[1])
    if mask is not None:
        s = s.masked_fill_(~mask, masked) if torch.broadcast_shapes(mask.shape, s.shape) == s.shape \
            else s.masked_fill(~mask, masked)
    m = s.amax(-1, keepdim=True).detach()
    p = s.sub_(m).exp_()  # masked pairs: exp(MASKED - m) = 0 unless the whole row is masked
    denom = p.sum(-1, keepdim=True)
    if dropout_p > 0.:
        p = F.dropout(p, dropout_p, True)
    out = (torch.matmul(p.to(v.dtype), v) / denom).to(v.dtype)
    lse = m + torch.log(denom)
    if mask is not None:
        seen = m > masked / 2  # the row sees at least one key
        out = out.masked_fill(~seen, 0.)
        lse = torch.where(seen, lse, empty_lse)
    return out, lse.squeeze(-1)


def merge_lse(parts: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Combine attention pieces over disjoint key sets into the softmax over their union.

    Args:
        parts: ``(out [..., n, D], lse [..., n])`` pairs from `attention_lse` (same shapes).

    Returns:
        [..., n, D]: ``Σ_p out_p · exp(lse_p - lse)`` with ``lse = logsumexp_p lse_p``.
    """
    if len(parts) == 1:
        return parts[0][0]
    total = torch.logsumexp(torch.stack([part[1] for part in parts]), dim=0)
    out = parts[0][0] * torch.exp(parts[0][1] - total).unsqueeze(-1).to(parts[0][0].dtype)
    for o, lse in parts[1:]:
        out = out + o * torch.exp(lse - total).unsqueeze(-1).to(o.dtype)
    return out


def pad_to_multiple(x: Tensor, multiple: int, dim: int, value: float = 0.) -> Tensor:
    """Pad ``x`` at the end of ``dim`` to a length divisible by ``multiple`` (a bool ``x`` is padded with
    ``bool(value)``; scripted callers pass a float: TorchScript takes no bool for it)."""
    extra = -x.shape[dim] % multiple
    if not extra:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def key_mask_of(key_padding_mask: Tensor | None, q: Tensor) -> Tensor:
    """``[B, N]`` key-padding mask (or None) -> bool ``[B, 1, N]`` broadcastable over the heads of ``q``."""
    B, _, N, _ = q.shape
    if key_padding_mask is None:
        return torch.ones(B, 1, N, dtype=torch.bool, device=q.device)
    return key_padding_mask[:, None, :].to(torch.bool)


def _band_attention_lse(
        q: Tensor, k: Tensor, v: Tensor, window: int, causal: bool, key_mask: Tensor, scale: float,
        tags: Tensor | None, self_score: float | None, dropout_p: float,
) -> tuple[Tensor, Tensor]:
    """Undilated sliding window: query i sees keys i-window..i+window (..i if causal), block by block."""
    N = q.shape[-2]
    b = min(N, max(window, 32))
    nb = -(-N // b)
    right = 0 if causal else window
    span = b + window + right
    lead: list[int] = list(q.shape[:-2])
    qb = pad_to_multiple(q, b, -2).reshape(lead + [nb, b, q.shape[-1]])
    kb, vb = _band(k, b, window, right, True), _band(v, b, window, right, True)
    i = torch.arange(b, device=q.device)[:, None]
    j = torch.arange(span, device=q.device)[None, :]
    rel = j - window - i  # key position minus query position
    allowed = (rel >= -window) & (rel <= (0 if causal else window))  # [b, span]
    mask = _band(key_mask, b, window, right, False).unsqueeze(-2) & allowed  # [..., nb, b, span]
    if tags is not None:
        tq = pad_to_multiple(tags, b, -1, -1.).reshape(list(tags.shape[:-1]) + [nb, b])
        mask = mask & (tq.unsqueeze(-1) == _band(tags, b, window, right, False, -2.).unsqueeze(-2))
    fill: tuple[Tensor, float] | None = None
    if self_score is not None:
        fill = (rel == 0, self_score)
    out, lse = attention_lse(qb, kb, vb, mask, scale=scale, fill=fill, dropout_p=dropout_p)
    return out.flatten(-3, -2)[..., :N, :], lse.flatten(-2)[..., :N]


def _band(x: Tensor, b: int, window: int, right: int, feat: bool, value: float = 0.) -> Tensor:
    """``[..., N(, D)] -> [..., nb, span(, D)]``: block ``c`` (of ``b`` queries) sees positions
    ``c*b - window .. c*b + b + right - 1``, padded with ``value`` outside ``[0, N)``."""
    span = b + window + right
    if feat:
        x = F.pad(pad_to_multiple(x, b, -2, value), (0, 0, window, right), value=value)
        return x.unfold(-2, span, b).transpose(-1, -2)
    x = F.pad(pad_to_multiple(x, b, -1, value), (window, right), value=value)
    return x.unfold(-1, span, b)


def window_attention_lse(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        window: int,
        dilation: int = 1,
        causal: bool = False,
        key_mask: Tensor | None = None,
        scale: float | None = None,
        tags: Tensor | None = None,
        self_score: float | None = None,
        dropout_p: float = 0.,
) -> tuple[Tensor, Tensor]:
    """Sliding-window softmax attention with dilation, and its log-sum-exp; memory O(N·window).

    Query i attends to keys ``i + j·dilation`` for ``j = -window .. window`` (``j <= 0`` when ``causal``).
    A dilated window is the undilated window applied to each residue class ``i mod dilation``.

    Args:
        q, k, v: [..., N, D].
        window: keys on each side (``>= 0``).
        dilation: gap between attended keys (``>= 1``).
        causal: attend only to keys at or before the query.
        key_mask: bool broadcastable to [..., N]; False = the key is padding.
        scale: multiplier of ``q·k`` (default ``D ** -0.5``).
        tags: int [..., N]; when given, a query sees only keys with its own tag.
        self_score: the score of a query with itself (Reformer's ``-5e4``: itself only when it sees nothing else).
        dropout_p: dropout probability on the attention weights (see `attention_lse`).

    Returns:
        ``(out [..., N, D], lse [..., N])``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if key_mask is None:
        key_mask = torch.ones(q.shape[-2], dtype=torch.bool, device=q.device)
    if dilation == 1:
        return _band_attention_lse(q, k, v, window, causal, key_mask, scale, tags, self_score, dropout_p)
    N = q.shape[-2]

    out, lse = _band_attention_lse(
        split_residues(q, dilation), split_residues(k, dilation), split_residues(v, dilation), window, causal,
        split_residues(key_mask, dilation, feat=False), scale,
        None if tags is None else split_residues(tags, dilation, feat=False, value=-1.), self_score, dropout_p)
    return merge_residues(out, N), merge_residues(lse, N, feat=False)


def split_residues(x: Tensor, stride: int, feat: bool = True, value: float = 0.) -> Tensor:
    """``[..., N(, D)] -> [..., stride, ceil(N/stride)(, D)]``: the residue classes ``i mod stride`` (padded)."""
    if feat:
        return pad_to_multiple(x, stride, -2, value).unflatten(-2, (-1, stride)).transpose(-2, -3)
    return pad_to_multiple(x, stride, -1, value).unflatten(-1, (-1, stride)).transpose(-1, -2)


def merge_residues(x: Tensor, n: int, feat: bool = True) -> Tensor:
    """Inverse of `split_residues`, cut to length ``n``."""
    if feat:
        return x.transpose(-2, -3).flatten(-3, -2)[..., :n, :]
    return x.transpose(-1, -2).flatten(-2)[..., :n]


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """``x [..., N, D]``, ``idx [..., M]`` (int, same leading dims or broadcastable) -> ``[..., M, D]``."""
    lead: list[int] = list(torch.broadcast_shapes(x.shape[:-2], idx.shape[:-1]))
    x = x.expand(lead + list(x.shape[-2:]))
    idx = idx.expand(lead + [idx.shape[-1]])
    return torch.gather(x, -2, idx.unsqueeze(-1).expand(list(idx.shape) + [x.shape[-1]]))


def scatter_rows(src: Tensor, idx: Tensor, n: int) -> Tensor:
    """Inverse of `gather_rows` for a permutation: ``out[..., idx[m], :] = src[..., m, :]``, length ``n``."""
    out = src.new_zeros(list(src.shape[:-2]) + [n, src.shape[-1]])
    return out.scatter(-2, idx.unsqueeze(-1).expand_as(src), src)


def look_back(x: Tensor, dim: int) -> Tensor:
    """Chunks along ``dim`` (the chunk axis), each joined with its previous chunk (the first with the last).

    ``x [..., nc, c, *]`` -> ``[..., nc, 2c, *]`` where the chunk axis is ``dim`` and the item axis ``dim + 1``.
    A single chunk is returned as is (it has no other chunk to look at).
    """
    if x.shape[dim] == 1:
        return x
    return torch.cat([x, x.roll(1, dims=dim)], dim=dim + 1)


def _mix(x: Tensor) -> Tensor:
    """One xorshift-multiply round on 31-bit values (int64 ``x`` in ``[0, 2^31)``)."""
    low31 = 0x7FFFFFFF  # the hash works on 31-bit values: no product of two of them overflows int64
    x = ((x ^ (x >> 16)) * 0x2C1B3C6D) & low31
    x = ((x ^ (x >> 13)) * 0x297A2D39) & low31
    return x ^ (x >> 16)


def hash_bits(seed: int, shape: list[int], stream: int = 0) -> Tensor:
    """Counter-based random 31-bit ints ``[*shape]`` int64 (CPU): a hash of each element's flat index, ``seed``
    and ``stream``, in plain tensor arithmetic.

    The same arguments give the same numbers on every call, and no ``torch.Generator`` is created, so that the
    random patterns of the seeded mixers are traced whole by ``torch.compile(fullgraph=True)``. Computed on the
    CPU (move the result): any device works, meta included.
    """
    key = (seed * 0x9E3779B1 + stream * 0x632BE5AB + 0x5BD1E995) % 0x80000000  # exact in int64 too
    numel = 1
    for d in shape:
        numel *= d
    x = _mix((torch.arange(numel, dtype=torch.int64) + key) & 0x7FFFFFFF)
    return _mix(x ^ key).reshape(shape)


def hash_uniform(seed: int, shape: list[int], stream: int = 0) -> Tensor:
    """Counter-based uniform floats in ``[0, 1)``, ``[*shape]`` float64 (CPU); see `hash_bits`."""
    return hash_bits(seed, shape, stream).to(torch.float64) / 2 ** 31


def hash_normal(seed: int, shape: list[int], stream: int = 0) -> Tensor:
    """Counter-based standard normal samples ``[*shape]`` float64 (CPU), by Box-Muller; see `hash_bits`."""
    u1 = 1. - hash_uniform(seed, shape, 2 * stream)  # in (0, 1]: a finite log
    u2 = hash_uniform(seed, shape, 2 * stream + 1)
    return torch.sqrt(-2. * torch.log(u1)) * torch.cos(2 * math.pi * u2)


def ceil_log(n: int) -> int:
    """``ceil(ln n)`` (at least 1)."""
    return max(1, math.ceil(math.log(max(n, 2))))


class SeededMixin:
    """A ``seed`` for a mixer's random pattern, kept in the state dict (as extra state, a 0-d int64 tensor).

    ``seed=None`` draws it from torch's global generator at construction, so the layers of a model built after
    ``torch.manual_seed`` get different but reproducible patterns (the papers draw per layer); a loaded state
    dict restores the seed, hence the pattern. (No class annotation of ``seed``: TorchScript would read it as the
    unresolved string ``'int'``; it infers the int attribute from its value.)
    """

    def init_seed(self, seed: int | None) -> None:
        # drawn on the CPU, so that building under ``with torch.device('meta')`` works too
        self.seed: int = (int(torch.randint(0, 2 ** 31 - 1, (), device='cpu')) if seed is None
                          else check_int('seed', seed, 0))

    def get_extra_state(self) -> Tensor:
        return torch.tensor(self.seed, dtype=torch.int64)

    def set_extra_state(self, state: Tensor) -> None:
        if state.device.type != 'meta':
            self.seed = int(state)
