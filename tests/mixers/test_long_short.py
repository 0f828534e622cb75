"""Long-Short Transformer against a dense float64 reference written from the paper's equations: the r landmarks
``LN_L(softmax(x W_P)ᵀ k)`` and the segment-wise window over ``LN_S(k)``, one softmax over their union, outputs and
gradients, padded and causal (the segment-wise dynamic projection built segment by segment).

No convergence-to-``full`` test: Long-Short is not an approximation of softmax attention that becomes exact at some
budget (its DualLN keys and its landmarks stay whatever the window and r)."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, build, linear, out_proj, qkv  # noqa: E402

N, C, H = 37, 30, 2
D = C // H


def layer_norm(m, t, name):
    """LayerNorm ``name`` over the C channels of each token of t [B, H, M, D]."""
    B, _, M, _ = t.shape
    ln = getattr(m, name)
    t = F.layer_norm(t.transpose(1, 2).reshape(B, M, C), (C,), ln.weight, ln.bias)
    return t.reshape(B, M, H, D).transpose(1, 2)


def reference(m, x, kpm=None, causal=False):
    q, k, v = qkv(m, x)
    B, n = x.shape[:2]
    w, r, seg = m.window, m.num_landmarks, m.segment_size
    real = torch.ones(B, n, dtype=torch.bool) if kpm is None else kpm
    logits = linear(x, dict(m.named_parameters()), 'dconv_fc').reshape(B, n, H, r).permute(0, 2, 3, 1)  # [B,H,r,N]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    if causal:
        near = (j <= i) & (j > i - w)
        kl, vl, vis = [], [], []
        for s in range(0, n, seg):  # one dynamic projection per segment, seen by the later segments
            p = torch.softmax(logits[..., s:s + seg].masked_fill(~real[:, None, None, s:s + seg], -torch.inf), -1)
            p = p.nan_to_num(0.)
            kl.append(p @ k[:, :, s:s + seg])
            vl.append(p @ v[:, :, s:s + seg])
            vis.append(((i // seg > s // seg) & real[:, s:s + seg].any(-1)[:, None, None]).expand(B, n, r))
        kl, vl, vis = torch.cat(kl, 2), torch.cat(vl, 2), torch.cat(vis, -1)[:, None]
    else:
        ext = max(w // 2, 1)
        start = i // w * w
        near = (j >= start - ext) & (j < start + w + ext)
        p = torch.softmax(logits.masked_fill(~real[:, None, None, :], -torch.inf), -1)
        kl, vl = p @ k, p @ v
        vis = real.any(-1)[:, None, None, None].expand(B, 1, n, r)
    kl, vl = layer_norm(m, kl, 'dual_ln_l'), layer_norm(m, vl, 'dual_ln_l')
    ks, vs = layer_norm(m, k, 'dual_ln_s'), layer_norm(m, v, 'dual_ln_s')
    scores = torch.cat([q @ kl.transpose(-1, -2), q @ ks.transpose(-1, -2)], -1) * m.scale
    keep = torch.cat([vis, (near & real[:, None, :])[:, None]], -1)
    a = torch.softmax(scores.masked_fill(~keep, -torch.inf), -1).nan_to_num(0.)
    return out_proj(m, a @ torch.cat([vl, vs], 2))


@pytest.mark.parametrize('window,landmarks,segment,causal', [(4, 3, 5, False), (5, 2, 7, True), (1, 2, 4, True)])
def test_matches_the_papers_equations(window, landmarks, segment, causal):
    m = build('long_short', C, H, window=window, num_landmarks=landmarks, segment_size=segment)
    x = torch.randn(2, N, C, dtype=torch.float64)
    kpm = torch.rand(2, N) > 0.3
    kpm[1, 20:] = False  # whole segments of padding
    assert_matches(m, x, lambda t: reference(m, t, causal=causal), is_causal=causal)
    assert_matches(m, x, lambda t: reference(m, t, kpm, causal=causal), attn_mask=kpm, is_causal=causal)


def test_bfloat16_runs_in_float32():
    m = build('long_short', C, H, window=4, num_landmarks=3)
    x = torch.randn(2, N, C, dtype=torch.float64)
    ref = m.float()(x.float())
    low = m.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert low.dtype == torch.bfloat16
    assert ((low.float() - ref).norm() / ref.norm()).item() < 0.05


def test_arguments():
    for arg in ('window', 'num_landmarks', 'segment_size'):
        with pytest.raises(ValueError, match=arg):
            build('long_short', C, H, **{arg: 0})
    m = build('long_short', C, H, num_landmarks=5)
    assert m.dconv_fc.out_features == H * 5 and m.dual_ln_s.normalized_shape == m.dual_ln_l.normalized_shape == (C,)
