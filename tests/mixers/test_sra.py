"""The ``sra`` grid mixer (PVT's spatial-reduction attention, PVT v2's linear SRA): timm's
``timm.models.pvt_v2.Attention`` with the same weights (mapped by `convert_q_kv_state_dict`), outputs and every
gradient in float64, on grids that are not multiples of the ratio; a float64 reference written here from PVT's
equations (the reduction conv as an explicit sum over the R×R patches of every block) with prefix tokens, a grid
shorter than R and a grid given at forward; ``sr_ratio=1`` is full attention; TorchScript of every form; errors."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.models import pvt_v2

import visattn
from visattn.mixers import convert_q_kv_state_dict

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, assert_scripts, build, linear, out_proj, softmax_over, split  # noqa: E402

C, HEADS = 8, 2


def reduce_ref(params, grid, R):
    """Conv with kernel = stride = R (no padding; a side shorter than R zero-padded to R), written as the sum over
    the R×R offsets of every block, then LayerNorm: [B, C, H, W] -> [B, M, C]."""
    if grid.shape[2] < R or grid.shape[3] < R:
        grid = F.pad(grid, (0, max(R - grid.shape[3], 0), 0, max(R - grid.shape[2], 0)))
    h, w = grid.shape[2] // R, grid.shape[3] // R
    out = params['sr.bias'][None, :, None, None]
    for a in range(R):
        for b in range(R):
            patch = grid[:, :, a:h * R:R, b:w * R:R]  # pixel (a, b) of every block: [B, C, h, w]
            out = out + torch.einsum('oc,bchw->bohw', params['sr.weight'][:, :, a, b], patch)
    t = out.flatten(2).transpose(1, 2)
    return F.layer_norm(t, (C,), params['sr_norm.weight'], params['sr_norm.bias'])


def reference(m, x, H, W):
    """softmax(q_i (k_j)ᵀ / sqrt(d)) v over the keys [prefix tokens; SR(patch grid)], all through ``qkv``."""
    params, P, R = dict(m.named_parameters()), m.num_prefix_tokens, m.sr_ratio
    grid = x[:, P:].transpose(1, 2).reshape(x.shape[0], C, H, W)
    source = torch.cat([x[:, :P], reduce_ref(params, grid, R) if R > 1 else x[:, P:]], 1)
    q = split(linear(x, params, 'qkv', slice(0, C)), HEADS)
    k, v = (split(linear(source, params, 'qkv', slice(i * C, (i + 1) * C)), HEADS) for i in (1, 2))
    return out_proj(m, softmax_over(q, k, v, torch.ones(1, dtype=torch.bool), m.scale))


CASES = [((7, 9), 2, 1), ((7, 9), 3, 2), ((6, 4), 2, 0), ((1, 5), 2, 1), ((5, 5), 1, 1)]


@pytest.mark.parametrize('hw,sr,prefix', CASES, ids=[f'{h}x{w}-r{r}-p{p}' for (h, w), r, p in CASES])
def test_matches_reference_output_and_gradients(hw, sr, prefix):
    H, W = hw
    m = build('sra', C, HEADS, feat_size=hw, num_prefix_tokens=prefix, sr_ratio=sr, qkv_bias=True)
    assert_matches(m, torch.randn(2, prefix + H * W, C, dtype=torch.float64), lambda t: reference(m, t, H, W))


def test_other_grid_at_forward_matches_reference():
    m = build('sra', C, HEADS, feat_size=(4, 4), num_prefix_tokens=1, sr_ratio=2)
    assert_matches(m, torch.randn(1, 1 + 5 * 7, C, dtype=torch.float64), lambda t: reference(m, t, 5, 7),
                   feat_size=(5, 7))


@pytest.mark.parametrize('kw', [dict(sr_ratio=2), dict(sr_ratio=3), dict(sr_ratio=1), dict(linear=True)],
                         ids=['r2', 'r3', 'r1', 'linear'])
def test_equals_timm_pvt_v2_attention(kw):
    """timm's PVT v2 attention on a 7×9 grid (not a multiple of the ratio) without prefix tokens: its state dict,
    mapped (``qkv`` = [q; kv], ``norm`` -> ``sr_norm``), loads strictly; outputs and the gradients of the input and
    of every parameter (ours ``qkv`` against theirs [q; kv]) within 1e-10."""
    torch.manual_seed(0)
    theirs = pvt_v2.Attention(C, HEADS, sr_ratio=kw.get('sr_ratio', 1), linear_attn=kw.get('linear', False),
                              qkv_bias=True).double()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ours = visattn.create_mixer('sra', C, num_heads=HEADS, feat_size=(7, 9), num_prefix_tokens=0, qkv_bias=True,
                                dtype=torch.float64, **kw)
    ours.load_state_dict(convert_q_kv_state_dict(theirs.state_dict()))
    x = torch.randn(2, 63, C, dtype=torch.float64)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    out, want = ours(xs[0]), theirs(xs[1], [7, 9])
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-10, atol=1e-10)
    mapped = convert_q_kv_state_dict({n: p.grad for n, p in theirs.named_parameters()})
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, mapped[name], rtol=1e-10, atol=1e-10, msg=f'gradient of {name}')


def test_ratio_one_is_full_attention():
    m = build('sra', C, HEADS, feat_size=(3, 5), num_prefix_tokens=2, sr_ratio=1)
    full = visattn.create_mixer('full', C, num_heads=HEADS, dtype=torch.float64).eval()
    full.load_state_dict(m.state_dict())
    x = torch.randn(2, 17, C, dtype=torch.float64)
    torch.testing.assert_close(m(x), full(x), rtol=1e-12, atol=1e-12)


def test_linear_keys_do_not_grow_with_the_grid():
    """Linear SRA attends to P + pool_size² keys at any grid: the keys of two grids have the same count."""
    m = build('sra', C, HEADS, feat_size=(4, 4), num_prefix_tokens=1, linear=True, pool_size=3)
    for hw in ((4, 4), (9, 11), (2, 2)):
        x = torch.randn(1, 1 + hw[0] * hw[1], C, dtype=torch.float64)
        q, k, v = m.reduced_qkv(x, *hw)
        assert q.shape[2] == x.shape[1] and k.shape[2] == v.shape[2] == 1 + 9


@pytest.mark.parametrize('kw', [dict(sr_ratio=2), dict(sr_ratio=1), dict(linear=True)], ids=['r2', 'r1', 'linear'])
def test_torchscript_matches_eager(kw):
    m = build('sra', C, HEADS, feat_size=(5, 6), num_prefix_tokens=1, **kw).float()
    assert_scripts(m, torch.randn(2, 31, C))


def test_bad_arguments_and_refused_calls():
    for kw, match in ((dict(sr_ratio=0), 'sr_ratio'), (dict(pool_size=0), 'pool_size'), (dict(sr_ratio=1.5),
                                                                                           'sr_ratio')):
        with pytest.raises((ValueError, TypeError), match=match):
            build('sra', C, HEADS, feat_size=(4, 4), **kw)
    m = build('sra', C, HEADS, feat_size=(2, 3), num_prefix_tokens=1)
    x = torch.randn(1, 7, C, dtype=torch.float64)
    with pytest.raises(ValueError, match='mask'):
        m(x, attn_mask=torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match='causal'):
        m(x, is_causal=True)
