"""Shared checks of the dense float64 references of the full-attention variants (talking_heads, collaborative,
normalized): every mask a mixer with ``supports_dense_mask`` honours, and equality with ``full``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from _grid_ref import assert_matches

import visattn


def assert_matches_under_masks(
        m: torch.nn.Module, x: torch.Tensor, reference: Callable[..., torch.Tensor], seed: int = 42,
) -> None:
    """``m`` equals ``reference(t, visible=None, add=None)`` (outputs and every gradient, see `assert_matches`)
    without a mask, with key padding, key padding and causality, a per-head bool mask with a row that sees no key,
    and a float mask added to the logits. ``visible`` is bool, broadcastable to [B, H, N, N]."""
    gen = torch.Generator().manual_seed(seed)
    B, N, _ = x.shape
    H = m.num_heads
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[0, N - N // 3:] = False
    keep[-1, :2] = False
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    per_head = torch.rand(B, H, N, N, generator=gen) > 0.4
    per_head[-1, H - 1, N // 2] = False
    additive = torch.randn(B, 1, N, N, generator=gen, dtype=x.dtype)
    padded = keep[:, None, None, :]
    assert_matches(m, x, lambda t: reference(t))
    assert_matches(m, x, lambda t: reference(t, visible=padded), attn_mask=keep)
    assert_matches(m, x, lambda t: reference(t, visible=causal & padded), attn_mask=keep, is_causal=True)
    assert_matches(m, x, lambda t: reference(t, visible=per_head), attn_mask=per_head)
    assert_matches(m, x, lambda t: reference(t, add=additive), attn_mask=additive)


def assert_equals_full(m: torch.nn.Module, x: torch.Tensor) -> None:
    """``m`` computes what ``full`` (multi-head softmax attention) with its ``qkv`` and ``proj`` computes: plain,
    key-padded and causal."""
    full = visattn.create_mixer('full', m.dim, num_heads=m.num_heads, dtype=x.dtype).eval()
    full.load_state_dict(m.state_dict(), strict=False)
    keep = torch.rand(x.shape[0], x.shape[1]) > 0.3
    for call in ({}, dict(attn_mask=keep), dict(is_causal=True)):
        torch.testing.assert_close(m(x, **call), full(x, **call), rtol=1e-10, atol=1e-10)
