"""``reformer`` (Reformer, 2001.04451) with several hash rounds: ``rounds='separate'`` (the paper, Appendix A) equals
the log-sum-exp combination of single-round LSH attentions, each over the chunks of its own sorted sequence;
``rounds='joint'`` equals a reference built the reformer-pytorch way (the rounds sorted end to end as one sequence
whose chunks look one back across round boundaries), and reformer-pytorch's ``LSHAttention`` itself with the same
rotations when it is installed. Float64 dense references, outputs and every gradient, key padding, N=37 with chunks
of 4 (a chunk straddles two rounds in the joint layout). (One bucket, causality, self-attention rule:
tests/mixers/test_mixers_sparse.py.)"""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import visattn
from visattn.mixers._sparse_utils import hash_normal

sys.path.insert(0, str(Path(__file__).parent))
from _pattern_ref import assert_same_function  # noqa: E402

B, C, H, N, R, CH = 2, 24, 3, 37, 3, 4


def make(n: int = N, **kw) -> torch.nn.Module:
    torch.manual_seed(42)
    kw = {'bucket_size': CH, 'n_hashes': R, 'seed': 7, **kw}
    return visattn.create_mixer('reformer', C, num_heads=H, dtype=torch.float64, **kw).eval()


def inputs(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(42)
    x = torch.randn(B, n, C, dtype=torch.float64)
    kpm = torch.rand(B, n) > 0.25
    kpm[:, 0] = True
    return x, kpm


def chunked_rounds_ref(m, x, kpm, joint: bool):
    """Per round r: the tokens sorted by (bucket of round r, position) (padding in a bucket of its own, last); the
    sorted sequences chunked apart (separate) or laid end to end and chunked as one (joint); a slot attends to its
    chunk and the previous one (cyclically), keys = unit queries, itself at -5e4, padded keys hidden. The rounds'
    outputs o^(r) combine as Σ_r exp(z^(r) - logsumexp_r z^(r)) o^(r)."""
    q, _, v = m.split_heads(x)
    n = q.shape[2]
    keys = F.normalize(q, dim=-1)
    with torch.no_grad():
        buckets = m.hash(keys).masked_fill(~kpm[:, None, None, :], m.buckets_for(n))  # [B, H, R, N]
        order = (buckets * n + torch.arange(n)).argsort(-1)
    sequences = [order.flatten(2)] if joint else list(order.unbind(2))  # slot -> position, [B, H, L] each
    outs, lses = torch.zeros(R, B, H, n, v.shape[-1], dtype=v.dtype), torch.zeros(R, B, H, n, dtype=v.dtype)
    for part, pos in enumerate(sequences):
        L = pos.shape[-1]
        chunk = torch.arange(L) // CH
        nc = int(chunk[-1]) + 1
        window = (chunk[None, :] == chunk[:, None]) | ((chunk[None, :] == (chunk[:, None] - 1) % nc) & (nc > 1))
        qs = torch.gather(q, 2, pos[..., None].expand(-1, -1, -1, q.shape[-1]))
        ks = torch.gather(keys, 2, pos[..., None].expand(-1, -1, -1, q.shape[-1]))
        vs = torch.gather(v, 2, pos[..., None].expand(-1, -1, -1, v.shape[-1]))
        s = (qs @ ks.transpose(-1, -2)) * m.scale
        s = torch.where(pos[..., :, None] == pos[..., None, :], torch.full_like(s, -5e4), s)
        allowed = window & torch.gather(kpm[:, None].expand(-1, H, -1), 2, pos)[..., None, :]
        s = s.masked_fill(~allowed, -1e300)
        top = s.amax(-1, keepdim=True)
        e = torch.exp(s - top) * allowed
        denom = e.sum(-1, keepdim=True)
        o = e @ vs / denom.clamp_min(1e-300)
        z = torch.where(denom > 0, top + torch.log(denom.clamp_min(1e-300)), torch.full_like(denom, -1e30))[..., 0]
        for slot in range(L):  # slot -> (round, position)
            r = slot // n if joint else part
            outs[r].index_put_((torch.arange(B)[:, None], torch.arange(H)[None], pos[:, :, slot]), o[:, :, slot])
            lses[r].index_put_((torch.arange(B)[:, None], torch.arange(H)[None], pos[:, :, slot]), z[:, :, slot])
    weights = torch.exp(lses - torch.logsumexp(lses, 0, keepdim=True))
    return m.merge_heads((outs * weights[..., None]).sum(0))


@pytest.mark.parametrize('rounds', ['separate', 'joint'])
def test_rounds_match_their_reference(rounds):
    m = make(rounds=rounds)
    x, kpm = inputs()
    assert m.buckets_for(N) == 10 and -(-R * N // CH) * CH != R * N  # joint chunks straddle round boundaries
    assert_same_function(m, x, lambda t: chunked_rounds_ref(m, t, kpm, rounds == 'joint'), dict(attn_mask=kpm))


def test_joint_and_separate_differ_with_several_rounds_and_agree_otherwise():
    x, kpm = inputs()
    sep, joint = make(rounds='separate'), make(rounds='joint')
    assert not torch.allclose(sep(x, attn_mask=kpm), joint(x, attn_mask=kpm))
    torch.testing.assert_close(sep(x, is_causal=True), joint(x, is_causal=True), rtol=0, atol=0)
    one = make(rounds='joint', n_hashes=1)
    one_sep = make(rounds='separate', n_hashes=1)
    torch.testing.assert_close(one(x, attn_mask=kpm), one_sep(x, attn_mask=kpm), rtol=0, atol=0)
    with pytest.raises(ValueError, match='rounds'):
        make(rounds='together')


def test_joint_equals_reformer_pytorch(monkeypatch):
    """reformer-pytorch's LSHAttention (N divisible by 2·bucket_size, n_buckets = N / bucket_size), given our
    rotations in place of its torch.randn draw; its queries and values are ours, head by head."""
    lsh = pytest.importorskip('reformer_pytorch.reformer_pytorch')
    n = 32
    m = make(n, rounds='joint')
    x, _ = inputs(n)
    q, k, v = m.split_heads(x)
    D = q.shape[-1]
    rot = hash_normal(m.seed, [D, R, m.buckets_for(n) // 2]).to(torch.float64)
    peer = lsh.LSHAttention(bucket_size=CH, n_hashes=R, causal=False, dropout=0.).eval()
    real_randn = torch.randn

    def rotations(shape, *args, **kwargs):
        assert tuple(shape) == (1, D, R, rot.shape[-1])
        return rot[None].to(kwargs.get('dtype', torch.float64))

    with monkeypatch.context() as patch:
        patch.setattr(torch, 'randn', rotations)
        theirs, _, _ = peer(q.reshape(B * H, n, D), v.reshape(B * H, n, D))
    assert torch.randn is real_randn
    ours = m.attend(q, k, v, None, None, False)
    torch.testing.assert_close(ours, theirs.reshape(B, H, n, D), rtol=1e-10, atol=1e-10)
