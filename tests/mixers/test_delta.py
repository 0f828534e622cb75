"""DeltaNet against the paper's fast-weight update run token by token in float64 (outputs and gradients), DPFP
against its definition by index, chunk sizes, the final-weights read of a non-causal call, padding, arguments."""

import sys
from pathlib import Path

import pytest
import torch

from visattn.mixers.delta import dpfp

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, build, linear, out_proj, qkv  # noqa: E402

F64 = dict(dtype=torch.float64)
N, C, H = 11, 24, 3


def dpfp_by_index(x, nu):
    """``φ_ν(x)_{(j-1)·2D + i} = r_i · r_{(i - j) mod 2D}``, ``r = [relu(x), relu(-x)]``, j = 1..ν."""
    r = torch.cat([x.clamp_min(0), (-x).clamp_min(0)], -1)
    two_d = r.shape[-1]
    return torch.stack([r[..., i] * r[..., (i - j) % two_d] for j in range(1, nu + 1) for i in range(two_d)], -1)


def fast_weights(m, x, nu=1, keep=None):
    """The fast weight programmer token by token: returns the causal outputs and the final weights' reads."""
    q, k, v = qkv(m, x)
    beta = torch.sigmoid(linear(x, dict(m.named_parameters()), 'beta')).transpose(1, 2)  # [B, H, N]
    fq, fk = dpfp_by_index(q, nu), dpfp_by_index(k, nu)
    fq, fk = fq / fq.sum(-1, keepdim=True), fk / fk.sum(-1, keepdim=True)
    if keep is not None:
        beta = beta * keep[:, None]
    W = q.new_zeros(*q.shape[:2], v.shape[-1], fq.shape[-1])
    ys = []
    for i in range(x.shape[1]):
        v_old = (W * fk[:, :, i, None, :]).sum(-1)
        W = W + beta[:, :, i, None, None] * (v[:, :, i] - v_old)[..., None] * fk[:, :, i, None, :]
        ys.append((W * fq[:, :, i, None, :]).sum(-1))
    return out_proj(m, torch.stack(ys, 2)), out_proj(m, fq @ W.transpose(-2, -1))


@pytest.mark.parametrize('nu', [1, 2, 3])
def test_dpfp_matches_its_definition(nu):
    x = torch.randn(2, 5, 7, **F64)
    torch.testing.assert_close(dpfp(x, nu), dpfp_by_index(x, nu))


@pytest.mark.parametrize('causal', [True, False])
def test_matches_the_fast_weight_programmer(causal):
    m = build('delta', C, H, nu=2, chunk_size=4)  # 3 chunks: the weights carried between them too
    x = torch.randn(2, N, C, **F64)
    assert_matches(m, x, lambda t: fast_weights(m, t, nu=2)[0 if causal else 1], is_causal=causal)


def test_chunk_size_does_not_change_the_function():
    x = torch.randn(2, 37, C, **F64)
    with torch.no_grad():
        outs = [build('delta', C, H, chunk_size=c)(x, is_causal=True) for c in (1, 6, 64)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-11, atol=1e-12)


def test_padding_is_exact():
    """Padded tokens write nothing, so a padded sequence's real outputs are those of the sequence without them."""
    m = build('delta', C, H)
    x = torch.randn(2, N, C, **F64)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[0, 8:] = False
    mask[1, [0, 4, 5]] = False
    with torch.no_grad():
        for causal in (True, False):
            out = m(x, attn_mask=mask, is_causal=causal)
            for row in range(2):
                alone = m(x[row:row + 1, mask[row]], is_causal=causal)[0]
                torch.testing.assert_close(out[row, mask[row]], alone, rtol=1e-10, atol=1e-12)


def test_bad_arguments():
    for kw in (dict(nu=0), dict(nu=9), dict(chunk_size=0)):  # head dim 8: nu <= 8
        with pytest.raises(ValueError, match=next(iter(kw))):
            build('delta', C, H, **kw)
    with pytest.raises(ValueError, match='mask'):
        build('delta', C, H)(torch.randn(1, N, C, **F64), attn_mask=torch.zeros(1, 1, N, N, **F64))
