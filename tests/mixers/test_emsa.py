"""The ``emsa`` grid mixer (ResT's efficient multi-head self-attention) against a float64 reference written here from
ResT's eq. 4 and its released code: the depth-wise reduction (kernel s + 1, stride s, padding s // 2) as an explicit
sum over the kernel's offsets, LayerNorm, keys [prefix tokens; reduced grid], the 1×1 conv across heads as a sum over
heads, softmax, ``F.instance_norm`` of every head's map; output and every gradient for even and odd s, s = 1, one head
(no transform), grids too short for the kernel and a grid given at forward. Then TorchScript, options and errors."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, assert_scripts, build, linear, out_proj, split  # noqa: E402

C = 8


def reduce_ref(params, grid, s):
    """Depth-wise conv (kernel s + 1, stride s, padding s // 2; zero-padded at the bottom/right where the kernel would
    not fit), then LayerNorm: [B, C, H, W] -> [B, M, C]."""
    k, p = s + 1, s // 2
    grid = F.pad(grid, (p, p, p, p))
    grid = F.pad(grid, (0, max(k - grid.shape[3], 0), 0, max(k - grid.shape[2], 0)))
    h, w = (grid.shape[2] - k) // s + 1, (grid.shape[3] - k) // s + 1
    out = params['sr.bias'][None, :, None, None]
    for a in range(k):
        for b in range(k):
            tap = grid[:, :, a:a + (h - 1) * s + 1:s, b:b + (w - 1) * s + 1:s]  # [B, C, h, w]
            out = out + params['sr.weight'][None, :, 0, a, b, None, None] * tap
    t = out.flatten(2).transpose(1, 2)
    return F.layer_norm(t, (C,), params['sr_norm.weight'], params['sr_norm.bias'])


def reference(m, x, H, W):
    params, P, s, heads = dict(m.named_parameters()), m.num_prefix_tokens, m.sr_ratio, m.num_heads
    grid = x[:, P:].transpose(1, 2).reshape(x.shape[0], C, H, W)
    source = torch.cat([x[:, :P], reduce_ref(params, grid, s) if s > 1 else x[:, P:]], 1)
    q = split(linear(x, params, 'qkv', slice(0, C)), heads)
    k, v = (split(linear(source, params, 'qkv', slice(i * C, (i + 1) * C)), heads) for i in (1, 2))
    logits = q @ k.transpose(-1, -2) * m.scale  # [B, heads, N, P + M]
    if 'transform_conv.weight' in params:
        wt, bt = params['transform_conv.weight'], params['transform_conv.bias']
        logits = torch.stack([sum(wt[g, h, 0, 0] * logits[:, h] for h in range(heads)) + bt[g]
                              for g in range(heads)], 1)
        attn = F.instance_norm(torch.softmax(logits, -1), eps=1e-5)
    else:
        attn = torch.softmax(logits, -1)
    return out_proj(m, attn @ v)


CASES = [  # (H, W), sr_ratio, prefix tokens, heads
    ((7, 9), 2, 1, 2), ((7, 9), 3, 0, 4), ((6, 8), 4, 2, 2), ((1, 5), 3, 1, 2), ((5, 5), 1, 1, 2), ((7, 9), 2, 1, 1),
]


@pytest.mark.parametrize('hw,sr,prefix,heads', CASES, ids=[f'{h}x{w}-s{s}-p{p}-h{n}' for (h, w), s, p, n in CASES])
def test_matches_reference_output_and_gradients(hw, sr, prefix, heads):
    H, W = hw
    m = build('emsa', C, heads, feat_size=hw, num_prefix_tokens=prefix, sr_ratio=sr, qkv_bias=True)
    assert m.apply_transform == (heads > 1)
    assert_matches(m, torch.randn(2, prefix + H * W, C, dtype=torch.float64), lambda t: reference(m, t, H, W))


def test_other_grid_at_forward_matches_reference():
    m = build('emsa', C, 2, feat_size=(4, 4), num_prefix_tokens=1, sr_ratio=2)
    assert_matches(m, torch.randn(1, 1 + 5 * 7, C, dtype=torch.float64), lambda t: reference(m, t, 5, 7),
                   feat_size=(5, 7))


def test_without_transform_is_reduced_softmax_attention():
    """``apply_transform=False``: no ``transform_conv`` parameters, plain softmax over the reduced keys (the reference
    without its transform)."""
    m = build('emsa', C, 2, feat_size=(5, 6), num_prefix_tokens=1, apply_transform=False)
    assert not any('transform' in n for n, _ in m.named_parameters())
    assert_matches(m, torch.randn(2, 31, C, dtype=torch.float64), lambda t: reference(m, t, 5, 6))


@pytest.mark.parametrize('kw', [dict(sr_ratio=2), dict(sr_ratio=1, apply_transform=False)], ids=['s2', 's1-plain'])
def test_torchscript_matches_eager(kw):
    m = build('emsa', C, 2, feat_size=(5, 6), num_prefix_tokens=1, **kw).float()
    assert_scripts(m, torch.randn(2, 31, C))


def test_bf16_computes_in_float32():
    m = build('emsa', C, 2, feat_size=(5, 6), num_prefix_tokens=1).float()
    x = torch.randn(2, 31, C)
    out = m.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), m.float()(x), rtol=0.05, atol=0.05)


def test_bad_arguments_and_refused_calls():
    with pytest.raises(ValueError, match='sr_ratio'):
        build('emsa', C, 2, feat_size=(4, 4), sr_ratio=0)
    m = build('emsa', C, 2, feat_size=(2, 3), num_prefix_tokens=1)
    x = torch.randn(1, 7, C, dtype=torch.float64)
    with pytest.raises(ValueError, match='mask'):
        m(x, attn_mask=torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match='causal'):
        m(x, is_causal=True)
