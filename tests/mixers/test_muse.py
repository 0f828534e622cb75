"""MUSE (``muse``, 1911.09483): a float64 reference from the paper's three branches (softmax attention; the
separable convolutions written as sums of shifted value rows over the taps; the point-wise feed-forward layer) for
outputs and every gradient, centred and causal, with key padding and an even width; External-Attention-pytorch's
``MUSEAttention`` with the same weights (where installed); no branch but attention is multi-head attention; the
argument checks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import visattn

sys.path.insert(0, str(Path(__file__).parent))
from _grid_ref import assert_matches, build, linear, out_proj, qkv  # noqa: E402
from _mask_ref import assert_equals_full  # noqa: E402

F64 = torch.float64


def _reference(m: torch.nn.Module, x: torch.Tensor, keep: torch.Tensor | None = None,
               causal: bool = False) -> torch.Tensor:
    """proj(softmax attention) + Σ_i α_i PW_i(b_i + Σ_t w_i[t] v_(n + t - left)) + W_2 relu(W_1 x + b_1) + b_2,
    the convolutions as sums of shifted copies of the values."""
    params = dict(m.named_parameters())
    q, k, v = qkv(m, x)
    B, N, C = x.shape
    visible = torch.ones(B, 1, N, N, dtype=torch.bool)
    if keep is not None:
        visible = visible & keep[:, None, None, :]
    if causal:
        visible = visible & torch.ones(N, N, dtype=torch.bool).tril()
    logits = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~visible, float('-inf'))
    out = out_proj(m, torch.softmax(logits, -1).nan_to_num(0.) @ v)
    values = v.transpose(1, 2).reshape(B, N, C)
    if keep is not None:
        values = values * keep[..., None]
    alpha = torch.softmax(m.kernel_logits, 0)
    for i, width in enumerate(m.kernel_sizes):
        w, b = params[f'convs.{i}.depthwise.weight'][:, 0], params[f'convs.{i}.depthwise.bias']  # [C, width], [C]
        left = width - 1 if causal else (width - 1) // 2
        conv = b.expand(B, N, C)
        for t in range(width):  # tap t reads token n + t - left (zeros outside the sequence)
            shift = t - left
            shifted = torch.zeros_like(values)
            if 0 <= shift < N:
                shifted[:, :N - shift] = values[:, shift:]
            elif 0 < -shift < N:
                shifted[:, -shift:] = values[:, :N + shift]
            conv = conv + w[:, t] * shifted
        out = out + alpha[i] * linear(conv, params, f'convs.{i}.pointwise')
    if m.fc1 is not None:
        out = out + linear(torch.relu(linear(x, params, 'fc1')), params, 'fc2')
    return out


def test_matches_the_three_branches_with_padding_and_causality():
    m = build('muse', 12, 3, kernel_sizes=(1, 4, 5), ffn_ratio=2.)  # 4: an even width, one more zero on the right
    x = torch.randn(2, 11, 12, dtype=F64)
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[0, 7:] = False
    keep[1, 2:4] = False
    assert_matches(m, x, lambda t: _reference(m, t))
    assert_matches(m, x, lambda t: _reference(m, t, keep), attn_mask=keep)
    assert_matches(m, x, lambda t: _reference(m, t, causal=True), is_causal=True)
    assert_matches(m, x, lambda t: _reference(m, t, keep, causal=True), attn_mask=keep, is_causal=True)


def test_equals_external_attention_pytorch_muse_attention():
    """External-Attention-pytorch's layer (no feed-forward branch, kernel sizes 1, 3, 5 of which the width-1 one has
    no depth-wise convolution: ours is set to the identity) with the same weights. Its kernel weights are
    re-softmaxed in place at every call, which keeps equal weights equal: ours start equal."""
    muse = pytest.importorskip('fightingcv_attention.attention.MUSEAttention')
    C, h = 12, 3
    ours = build('muse', C, h, qkv_bias=True, kernel_sizes=(1, 3, 5), ffn_ratio=0.)
    theirs = muse.MUSEAttention(C, C // h, C // h, h).to(F64).eval()
    with torch.no_grad():
        ours.kernel_logits.zero_()
        ours.convs[0].depthwise.weight.fill_(1.)
        ours.convs[0].depthwise.bias.zero_()
        for i, lin in enumerate((theirs.fc_q, theirs.fc_k, theirs.fc_v)):
            lin.weight.copy_(ours.qkv.weight[i * C:(i + 1) * C])
            lin.bias.copy_(ours.qkv.bias[i * C:(i + 1) * C])
        theirs.fc_o.load_state_dict(ours.proj.state_dict())
        for conv, sep in zip((theirs.conv1, theirs.conv3, theirs.conv5), ours.convs):
            if sep.kernel_size > 1:
                conv.depth_conv.load_state_dict(sep.depthwise.state_dict())
            conv.pointwise_conv.weight.copy_(sep.pointwise.weight[..., None])
            conv.pointwise_conv.bias.copy_(sep.pointwise.bias)
    x = torch.randn(2, 29, C, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x, x, x), rtol=1e-10, atol=1e-10)


def test_attention_branch_alone_is_multi_head_attention():
    m = build('muse', 12, 3, kernel_sizes=(), ffn_ratio=0.)
    assert m.fc1 is None and len(m.convs) == 0
    assert_equals_full(m, torch.randn(2, 9, 12, dtype=F64))


def test_arguments_and_refusals():
    with pytest.raises(ValueError, match='kernel_sizes'):
        visattn.create_mixer('muse', 12, num_heads=3, kernel_sizes=(3, 0))
    with pytest.raises(TypeError, match='kernel_sizes'):
        visattn.create_mixer('muse', 12, num_heads=3, kernel_sizes=3)
    m = visattn.create_mixer('muse', 12, num_heads=3, ffn_ratio=4.).eval()
    assert m.fc1.out_features == 48 and m.kernel_sizes == (3, 15)
    with pytest.raises(ValueError, match='key-padding'):  # a per-pair mask cannot reach the convolutions
        m(torch.randn(1, 6, 12), attn_mask=torch.ones(1, 1, 6, 6, dtype=torch.bool))
