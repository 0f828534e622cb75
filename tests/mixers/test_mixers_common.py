"""Registry-driven tests over every registered token mixer: in timm's ViT, odd lengths, bf16, meta, masks,
causality, fixed lengths."""

import pytest
import timm
import torch

import visattn
from visattn.models.vit import vit_mixer_layer

MIXERS = visattn.list_mixers()
DIM, HEADS = 32, 4


def _build(name: str, seq_len: int = 24, **kw) -> torch.nn.Module:
    if visattn.info(f'mixer:{name}').requires_seq_len:
        kw.setdefault('seq_len', seq_len)
    return visattn.create_mixer(name, DIM, num_heads=HEADS, **kw).eval()


def _run(mixer: torch.nn.Module, x: torch.Tensor, **kw) -> torch.Tensor:
    torch.manual_seed(0)  # mixers that draw random numbers in forward draw the same ones on every call
    return mixer(x, **kw)


def _can_pad(name: str) -> bool:
    cls = visattn.get_mixer(name)
    return bool(getattr(cls, 'supports_key_padding', False) or getattr(cls, 'supports_dense_mask', False))


def test_registry_metadata_and_vit_models():
    assert len(MIXERS) >= 19
    for name in MIXERS:
        meta, cls = visattn.info(f'mixer:{name}'), visattn.get_mixer(name)
        assert meta.kind == 'mixer' and meta.arxiv and meta.paper
        assert meta.supports_causal == bool(getattr(cls, 'supports_causal', meta.supports_causal)), name
    assert set(visattn.list_models('vit_small_patch16_224_*')) == {f'vit_small_patch16_224_{m}' for m in MIXERS}
    assert set(visattn.list_mixers(causal=True)) == {m for m in MIXERS if visattn.info(f'mixer:{m}').supports_causal}


@pytest.mark.parametrize('name', MIXERS)
def test_in_timm_vit_forward_backward(name):
    model = timm.models.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4, num_classes=3,
        attn_layer=vit_mixer_layer(name, img_size=32, patch_size=8))
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    out.square().sum().backward()
    attn = model.blocks[0].attn
    missing = [n for n, p in attn.named_parameters() if p.grad is None]
    assert not missing, f'mixer parameters without gradient: {missing}'
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize('name', MIXERS)
def test_odd_length_batch_one(name):
    mixer = _build(name, seq_len=63)
    x = torch.randn(1, 63, DIM, requires_grad=True)
    out = _run(mixer, x)
    assert out.shape == (1, 63, DIM) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize('name', MIXERS)
def test_bf16_forward(name):
    mixer = _build(name, dtype=torch.bfloat16)
    out = _run(mixer, torch.randn(2, 17, DIM, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 17, DIM) and torch.isfinite(out).all()


@pytest.mark.parametrize('name', MIXERS)
def test_meta_device(name):
    mixer = _build(name, device='meta')
    assert all(t.device.type == 'meta' for t in list(mixer.parameters()) + list(mixer.buffers()))
    assert sum(p.numel() for p in mixer.parameters()) == sum(p.numel() for p in _build(name).parameters())


@pytest.mark.parametrize('name', MIXERS)
def test_padding_mask(name):
    mixer = _build(name)
    N = 20
    x = torch.randn(3, N, DIM)
    mask = torch.ones(3, N, dtype=torch.bool)
    mask[0, 13:] = False
    mask[1, :3] = False
    mask[2] = False  # every key padded: finite output, no NaN
    if not _can_pad(name):
        with pytest.raises(ValueError, match='mask'):
            mixer(x, attn_mask=mask)
        return
    out = _run(mixer, x, attn_mask=mask)
    assert out.shape == x.shape and torch.isfinite(out).all()
    x2 = torch.where(mask[..., None], x, 10 * torch.randn_like(x))
    out2 = _run(mixer, x2, attn_mask=mask)
    torch.testing.assert_close(out2[mask], out[mask], rtol=1e-4, atol=1e-5)
    dense = _run(mixer, x, attn_mask=mask[:, None, None, :])  # SDPA's broadcast layout of the same mask
    torch.testing.assert_close(dense[mask], out[mask], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', MIXERS)
def test_causality(name):
    mixer = _build(name)
    x = torch.randn(2, 20, DIM)
    if not visattn.info(f'mixer:{name}').supports_causal:
        with pytest.raises(ValueError, match='causal'):
            mixer(x, is_causal=True)
        return
    out = _run(mixer, x, is_causal=True)
    assert torch.isfinite(out).all()
    for t in (0, 9, 18):
        x2 = x.clone()
        x2[:, t + 1:] = 5 * torch.randn_like(x2[:, t + 1:])
        out2 = _run(mixer, x2, is_causal=True)
        torch.testing.assert_close(out2[:, :t + 1], out[:, :t + 1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(_run(mixer, x), out, atol=1e-4), 'is_causal=True changed nothing'


@pytest.mark.parametrize('name', [m for m in MIXERS if visattn.info(f'mixer:{m}').requires_seq_len])
def test_fixed_length_mixers_reject_other_lengths(name):
    with pytest.raises((ValueError, TypeError), match='seq_len'):
        visattn.create_mixer(name, DIM, num_heads=HEADS)
    mixer = _build(name, seq_len=16)
    with pytest.raises(ValueError, match='seq_len'):
        mixer(torch.randn(1, 20, DIM))


@pytest.mark.parametrize('name', MIXERS)
def test_bad_input_is_a_clear_error(name):
    mixer = _build(name)
    with pytest.raises(ValueError, match=str(DIM)):
        mixer(torch.randn(2, 8, DIM + 1))
    with pytest.raises(ValueError, match='attn_mask'):
        mixer(torch.randn(2, 8, DIM), attn_mask=torch.ones(2, 9, dtype=torch.bool))
