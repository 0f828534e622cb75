"""Registry-driven tests over every registered token mixer: in timm's ViT, odd lengths, bf16, meta, masks,
causality, fixed lengths."""

import pytest
import timm
import torch

import visattn
from visattn.mixers import length_kwargs
from visattn.models.vit import track_grid, vit_mixer_layer

MIXERS = visattn.list_mixers()
DIM, HEADS = 32, 4

# Mixers whose initialisation mixes (almost) no tokens by design, and the argument that makes them mix here, so that
# the mask and causality tests cannot pass vacuously: gMLP's spatial weights start at ~1e-6 (an FFN at first).
MIXING_INIT = {'gmlp': {'gate_init_std': 0.5}}


def _build(name: str, seq_len: int = 24, n: int | None = None, **kw) -> torch.nn.Module:
    """The mixer for inputs of ``n`` tokens (default ``seq_len``): fixed-length mixers get ``seq_len``, grid
    mixers the grid of ``n`` tokens."""
    kw = {**MIXING_INIT.get(name, {}), **kw}
    if visattn.info(f'mixer:{name}').requires_grid:
        kw = {**length_kwargs(name, seq_len if n is None else n), **kw}
    elif visattn.info(f'mixer:{name}').requires_seq_len:
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
    mixer = _build(name, n=17, dtype=torch.bfloat16)
    out = _run(mixer, torch.randn(2, 17, DIM, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 17, DIM) and torch.isfinite(out).all()


@pytest.mark.parametrize('name', MIXERS)
def test_meta_device(name):
    mixer = _build(name, device='meta')
    assert all(t.device.type == 'meta' for t in list(mixer.parameters()) + list(mixer.buffers()))
    assert sum(p.numel() for p in mixer.parameters()) == sum(p.numel() for p in _build(name).parameters())


@pytest.mark.parametrize('name', MIXERS)
def test_padding_mask(name):
    N = 20
    mixer = _build(name, n=N)
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
    mixer = _build(name, n=20)
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


GRID_MIXERS = [m for m in MIXERS if visattn.info(f'mixer:{m}').requires_grid]


def _grid_fixed(name: str) -> bool:
    """A grid mixer whose parameters are sized by its grid (class attribute ``grid_fixed``): it mixes only the grid
    it was built for and must refuse another with a ``ValueError`` naming its own."""
    return bool(getattr(visattn.get_mixer(name), 'grid_fixed', False))


@pytest.mark.parametrize('name', GRID_MIXERS)
def test_grid_mixers_need_and_check_the_grid(name):
    assert visattn.get_mixer(name).__mro__[1:] and issubclass(visattn.get_mixer(name), visattn.mixers.GridMixer)
    with pytest.raises(ValueError, match='feat_size'):
        visattn.create_mixer(name, DIM, num_heads=HEADS)
    mixer = _build(name, feat_size=(3, 4), num_prefix_tokens=1)
    with pytest.raises(ValueError, match='3x4'):
        mixer(torch.randn(1, 12, DIM))
    with pytest.raises(ValueError, match='num_prefix_tokens'):
        _build(name, feat_size=(3, 4), num_prefix_tokens=-1)


@pytest.mark.parametrize('name', GRID_MIXERS)
@pytest.mark.parametrize('prefix', [0, 1, 5])
def test_grid_mixers_prefix_tokens_and_feat_size_at_forward(name, prefix):
    mixer = _build(name, feat_size=(3, 5), num_prefix_tokens=prefix)
    x = torch.randn(2, prefix + 15, DIM, requires_grad=True)
    out = _run(mixer, x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    x2 = torch.randn(2, prefix + 8, DIM)
    if _grid_fixed(name):  # parameters sized by the grid: another grid at forward is a clear error
        with pytest.raises(ValueError, match='3x5'):
            mixer(x2, feat_size=(4, 2))
        return
    # another grid given at forward equals a mixer built for that grid with the same weights
    other = _build(name, feat_size=(4, 2), num_prefix_tokens=prefix)
    other.load_state_dict(mixer.state_dict())
    torch.testing.assert_close(_run(mixer, x2, feat_size=(4, 2)), _run(other, x2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', GRID_MIXERS)
def test_grid_mixers_in_vit_with_registers_and_dynamic_size(name):
    """Class and register tokens come from the ViT's arguments; with ``dynamic_img_size`` the grid follows the
    image: the output equals that of a ViT whose mixers were built for the image's grid, with the same weights."""
    kw = dict(patch_size=8, embed_dim=32, depth=1, num_heads=4, num_classes=3, reg_tokens=2)
    model = timm.create_model(f'vit_small_patch16_224_{name}', img_size=32, dynamic_img_size=True, **kw).eval()
    assert model.blocks[0].attn.num_prefix_tokens == 3 and model.blocks[0].attn.feat_size == (4, 4)
    x = torch.randn(1, 3, 40, 24)
    if _grid_fixed(name):  # parameters sized by the grid: the ViT keeps its image size and says so
        with pytest.raises(ValueError, match='4x4'):
            model(x)
        return
    torch.manual_seed(0)
    out = model(x)
    assert model.blocks[0].attn.dynamic_grid == (5, 3) and out.shape == (1, 3)
    fixed = timm.models.VisionTransformer(  # no track_grid: its mixers keep the 5x3 grid they were built for
        img_size=32, dynamic_img_size=True, attn_layer=vit_mixer_layer(name, (40, 24), 8, num_prefix_tokens=3), **kw)
    fixed.load_state_dict(model.state_dict())
    fixed.eval()
    torch.manual_seed(0)
    torch.testing.assert_close(fixed(x), out, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match='track_grid'):
        fixed(torch.randn(1, 3, 32, 32))
    hand = track_grid(timm.models.VisionTransformer(
        img_size=32, dynamic_img_size=True, attn_layer=vit_mixer_layer(name, 32, 8, num_prefix_tokens=3), **kw))
    hand.load_state_dict(model.state_dict())
    torch.manual_seed(0)
    torch.testing.assert_close(hand.eval()(x), out, rtol=1e-5, atol=1e-6)
