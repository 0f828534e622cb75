"""``yoso`` (2111.09714) against float64 references written from the paper's equations: YOSO-E's
``normalize((1 - arccos(q̂·k̂)/π)^τ V)``; the sampled form as the average over the hashes of the collision indicators
``[h(q_i) = h(k_j)]`` (hash codes recomputed here from the hyperplanes, bit by bit); its convergence to YOSO-E as the
number of hashes grows (fixed seeds); the backward, which is the paper's estimator and not the gradient of the forward,
against its formula with the exact and with the sampled kernel, and the convergence of the latter; the released
code's value convolution; seeding and rehashing; errors."""

import math

import pytest
import torch

import visattn
from visattn.mixers.yoso import _YosoCumulation

B, C, H, N = 2, 24, 3, 29


def make(**kw) -> torch.nn.Module:
    torch.manual_seed(42)
    kw.setdefault('seed', 3)
    return visattn.create_mixer('yoso', C, num_heads=H, dtype=torch.float64, **kw).eval()


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(42)
    x = torch.randn(B, N, C, dtype=torch.float64)
    kpm = torch.rand(B, N) > 0.3
    return x, kpm


def unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=-1, keepdim=True)


def codes_by_bits(m: torch.nn.Module, t: torch.Tensor) -> torch.Tensor:
    """Bucket ids [B, H, m, N]: bit b of hash r is ``t · r_{r, b} > 0`` for the module's hyperplanes."""
    planes = m.hyperplanes(t)  # [H, D, m·τ]
    codes = torch.zeros(t.shape[0], H, m.num_hash, t.shape[2], dtype=torch.long)
    for h in range(H):
        proj = t[:, h] @ planes[h]  # [B, N, m·τ]
        for r in range(m.num_hash):
            for bit in range(m.hash_code_len):
                codes[:, h, r] += (proj[..., r * m.hash_code_len + bit] > 0).long() << bit
    return codes


def kernel(m: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, sampled: bool) -> torch.Tensor:
    """``B(Q, K)`` exactly (arccos of the cosine) or as the hashes' collision frequency: [B, H, N, N]."""
    if not sampled:
        return (1 - torch.arccos(unit(q) @ unit(k).transpose(-1, -2)) / math.pi) ** m.hash_code_len
    cq, ck = codes_by_bits(m, unit(q)), codes_by_bits(m, unit(k))
    return (cq.unsqueeze(-1) == ck.unsqueeze(-2)).double().mean(2)


def reference(m: torch.nn.Module, x: torch.Tensor, kpm: torch.Tensor, sampled: bool) -> torch.Tensor:
    q, k, v = m.split_heads(x)
    real = kpm[:, None, :, None].double()
    y = (kernel(m, q, k, sampled) * real * real.transpose(-1, -2)) @ v
    out = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if m.conv is not None:
        w = m.conv.weight[:, 0, :, 0]  # [H, window]
        half = w.shape[1] // 2
        vm = v * real
        for t in range(w.shape[1]):
            shifted = torch.zeros_like(vm)
            lo, hi = max(0, half - t), min(N, N + half - t)  # rows i with i + t - half inside [0, N)
            shifted[:, :, lo:hi] = vm[:, :, lo + t - half:hi + t - half]
            out = out + w[:, t, None, None] * shifted
    return m.merge_heads(out)


@pytest.mark.parametrize('kw', [dict(expectation=True), dict(expectation=True, conv_window=5),
                                dict(num_hash=6, hash_code_len=3), dict(num_hash=5, hash_code_len=8, conv_window=3)])
def test_forward_matches_the_paper(kw):
    m = make(**kw)
    if m.conv is not None:
        with torch.no_grad():
            m.conv.weight.normal_()
    x, kpm = inputs()
    for mask in (None, kpm):
        ref = reference(m, x, torch.ones(B, N, dtype=torch.bool) if mask is None else kpm, not m.expectation)
        torch.testing.assert_close(m(x, attn_mask=mask), ref, rtol=1e-10, atol=1e-10)


def test_sampled_converges_to_the_expectation():
    x, kpm = inputs()
    exact = make(expectation=True, hash_code_len=4)(x, attn_mask=kpm)
    errors = {}
    for m_hashes in (8, 512):
        approx = make(num_hash=m_hashes, hash_code_len=4)(x, attn_mask=kpm)
        errors[m_hashes] = ((approx - exact).norm() / exact.norm()).item()
    assert errors[512] < 0.15 and errors[512] < errors[8] / 4, errors  # the error falls as 1 / sqrt(m): 8x


def _backward(sampled: bool, lsh_backward: bool, num_hash: int = 7, tau: int = 3):
    m = make(num_hash=num_hash, hash_code_len=tau)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, C // H, dtype=torch.float64) for _ in range(3))
    q, k = unit(q).requires_grad_(), unit(k).requires_grad_()
    v.requires_grad_()
    real = (torch.rand(B, 1, N) > 0.3).double().expand(B, H, N)
    q_codes, k_codes = (m.hash_codes(q.detach()), m.hash_codes(k.detach())) if sampled else (None, None)
    y = _YosoCumulation.apply(q, k, v, real, q_codes, k_codes, tau, 2 ** tau, lsh_backward)
    g = torch.randn_like(y)
    return m, q, k, v, real, y, g, torch.autograd.grad(y, [q, k, v], g)


@pytest.mark.parametrize('sampled,lsh_backward', [(False, False), (True, True), (True, False)])
def test_backward_is_the_papers_estimator(sampled, lsh_backward):
    m, q, k, v, real, y, g, grads = _backward(sampled, lsh_backward)
    with torch.no_grad():
        mask = real.unsqueeze(-1) * real.unsqueeze(-2)
        b_fwd = kernel(m, q, k, sampled) * mask
        torch.testing.assert_close(y, b_fwd @ v, rtol=1e-10, atol=1e-10)
        b = kernel(m, q, k, sampled and lsh_backward) * mask
        w = (g @ v.transpose(-1, -2)) * b  # (g_i · v_j) B_ij
        tau = m.hash_code_len
        for got, want in zip(grads, (tau / 2 * w @ k, tau / 2 * w.transpose(-1, -2) @ q, b.transpose(-1, -2) @ g)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_sampled_backward_converges_to_the_exact_estimator():
    exact = _backward(True, False, num_hash=1, tau=4)[-1]
    errors = {}
    for m_hashes in (8, 512):
        approx = _backward(True, True, num_hash=m_hashes, tau=4)[-1]
        errors[m_hashes] = max(((a - e).norm() / e.norm()).item() for a, e in zip(approx, exact))
    assert errors[512] < 0.15 and errors[512] < errors[8] / 4, errors  # the error falls as 1 / sqrt(m): 8x


def test_queries_and_keys_get_gradient():
    m = make(num_hash=4, hash_code_len=4)
    x, kpm = inputs()
    m(x, attn_mask=kpm).square().sum().backward()
    grad = m.qkv.weight.grad.view(3, C, C).abs().sum((1, 2))
    assert (grad > 0).all()  # the q, k and v rows of qkv


def test_seeded_hyperplanes_and_rehashing():
    x, _ = inputs()
    a, b, other = make(num_hash=4), make(num_hash=4), make(num_hash=4, seed=4)
    assert torch.equal(a(x), b(x)) and not torch.allclose(a(x), other(x))
    other.load_state_dict(a.state_dict())
    assert other.seed == 3 and torch.equal(other(x), a(x))
    fresh = make(num_hash=4, rehash_each_forward=True).train()
    assert not torch.allclose(fresh(x), fresh(x))
    assert torch.equal(fresh.eval()(x), a(x))


def test_errors():
    with pytest.raises(ValueError, match='causal'):
        make()(torch.randn(1, 5, C, dtype=torch.float64), is_causal=True)
    with pytest.raises(ValueError, match='conv_window'):
        make(conv_window=4)
    with pytest.raises(ValueError, match='hash_code_len'):
        make(hash_code_len=17)
