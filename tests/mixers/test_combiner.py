"""Combiner against a dense float64 reference written from the paper's factorisation
``p(j | i) = p(Ω_r | i) q(j | Ω_r)`` outside the direct support: the N×N matrix of attention weights is built entry
by entry (direct keys, then each region's summary weight times its internal distribution) and normalised once;
outputs and gradients, Combiner-Axial and Combiner-Fixed, padded and causal. Both become exact softmax attention
when the rows / segments hold one token or all of them."""

import sys
from pathlib import Path

import pytest
import torch

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, build, out_proj, qkv  # noqa: E402

N, C, H = 37, 30, 2


def reference(m, x, kpm=None, causal=False):
    q, k, v = qkv(m, x)
    B, n = x.shape[:2]
    size = m.segment_for(n)
    real = torch.ones(B, n, dtype=torch.bool) if kpm is None else kpm
    pos = torch.arange(n)
    row, col = pos // size, pos % size
    s = q @ k.transpose(-1, -2) * m.scale
    shift = s.amax(-1, keepdim=True)  # a constant per query: cancels
    same = row[:, None] == row[None, :]
    direct = same & real[:, None, None, :] & ((pos[None, :] <= pos[:, None]) if causal else True)
    a = torch.exp(s - shift) * direct  # [B, H, N, N]
    for b in range(int(row.max()) + 1):
        keys = row == b  # the region: row / segment b
        queries = (row > b) if causal else (row != b)  # the queries that see it as a region
        inside = keys[None, None, None, :] & real[:, None, None, :]
        if m.variant == 'axial':
            # query (a, c) reaches row b through the token (b, c) (or the last token, past the end): its key, and
            # its attention over row b
            t = (b * size + col).clamp(max=n - 1)  # [N]: that token for every query
            weight = torch.exp(s.gather(-1, t[None, None, :, None].expand(B, H, n, 1)) - shift)  # exp(q_i·k_t)
            internal = torch.softmax((s[:, :, t, :]).masked_fill(~inside, -torch.inf), -1).nan_to_num(0.)
            ok = real.gather(1, t[None, :].expand(B, n))  # [B, N]
        else:
            pool = keys[None, :] & real  # [B, N]
            q_max = q.masked_fill(~pool[:, None, :, None], -torch.inf).amax(2, keepdim=True)  # [B, H, 1, D]
            k_max = k.masked_fill(~pool[:, None, :, None], -torch.inf).amax(2, keepdim=True)
            ok = pool.any(-1, keepdim=True).expand(B, n)
            q_max, k_max = q_max.nan_to_num(0., neginf=0.), k_max.nan_to_num(0., neginf=0.)
            weight = torch.exp(q @ k_max.transpose(-1, -2) * m.scale - shift)  # [B, H, N, 1]
            internal = torch.softmax((q_max @ k.transpose(-1, -2) * m.scale).masked_fill(~inside, -torch.inf), -1)
            internal = internal.nan_to_num(0.)  # [B, H, 1, N]
        use = queries[None, None, :, None] & ok[:, None, :, None]
        a = a + torch.where(use, weight * internal, torch.zeros(()))
    z = a.sum(-1, keepdim=True)
    return out_proj(m, (a @ v) / z.clamp_min(1e-300))


@pytest.mark.parametrize('variant,size,causal', [('axial', None, False), ('axial', 6, True), ('fixed', 5, False),
                                                 ('fixed', 4, True)])
def test_matches_the_factorised_attention(variant, size, causal):
    m = build('combiner', C, H, variant=variant, segment_size=size)
    x = torch.randn(2, N, C, dtype=torch.float64)
    kpm = torch.rand(2, N) > 0.3
    kpm[1, 10:16] = False  # a whole row / segment of padding
    assert_matches(m, x, lambda t: reference(m, t, causal=causal), is_causal=causal)
    assert_matches(m, x, lambda t: reference(m, t, kpm, causal=causal), attn_mask=kpm, is_causal=causal)


@pytest.mark.parametrize('variant', ['axial', 'fixed'])
def test_exact_softmax_with_single_token_regions_or_one_region(variant):
    exact = build('full', C, H)
    x = torch.randn(2, N, C, dtype=torch.float64)
    kpm = torch.rand(2, N) > 0.3
    for size in (1, N, 64):
        m = build('combiner', C, H, variant=variant, segment_size=size)
        m.load_state_dict(exact.state_dict())
        for call in (dict(), dict(is_causal=True), dict(attn_mask=kpm)):
            torch.testing.assert_close(m(x, **call), exact(x, **call), rtol=1e-10, atol=1e-10)
    m = build('combiner', C, H, variant=variant, segment_size=6)
    m.load_state_dict(exact.state_dict())
    assert (m(x) - exact(x)).abs().max() > 1e-4  # in between, the regions really are summarised


def test_every_key_reaches_every_query():
    """Full attention: the gradient of any output reaches every input token (the direct row plus the regions)."""
    m = build('combiner', C, H, segment_size=6)
    for variant in ('axial', 'fixed'):
        m.variant = variant
        x = torch.randn(1, N, C, dtype=torch.float64, requires_grad=True)
        m(x)[0, 17].sum().backward()
        assert (x.grad[0].abs().sum(-1) > 0).all()


def test_arguments():
    with pytest.raises(ValueError, match='variant'):
        visattn.create_mixer('combiner', C, num_heads=H, variant='logsparse')
    with pytest.raises(ValueError, match='segment_size'):
        visattn.create_mixer('combiner', C, num_heads=H, segment_size=0)
    m = visattn.create_mixer('combiner', C, num_heads=H)
    assert [m.segment_for(n) for n in (1, 16, 17, 197)] == [1, 4, 5, 15]
