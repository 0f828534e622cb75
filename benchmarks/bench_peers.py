"""visattn against every maintained package that implements the same block, mixer or op, side by side on the CPU.

    pip install -e ".[bench]"                       # the peers (never core dependencies)
    python benchmarks/bench_peers.py --check        # same-function checks only (float64, weights mapped)
    python benchmarks/bench_peers.py                # checks, then time and peak memory of every pair
    python benchmarks/bench_peers.py --quick        # small shapes, few repeats: a smoke run
    python benchmarks/bench_peers.py --names sasa halo nystrom --processes 5 --repeats 10

Peers: timm (gating blocks, Halo, NonLocal, ViT ``Attention`` and the second-wave modules of
``bench_blocks_2d.py --peers``), mmcv-lite's bricks (``ContextBlock``, ``NonLocal2d``) and its criss-cross formula,
natten (CPU forward), External-Attention-pytorch (``fightingcv-attention``), performer-pytorch, linformer,
nystrom-attention, local-attention, reformer-pytorch, flash-linear-attention's PyTorch reference, and for the 2-D
local blocks a plain unfold implementation written here from the paper. A pair whose package does not import is
skipped with a note.

Same function first: each pair is built with the peer's parameters perturbed and mapped into ours, in float64, on
a small input: the max abs difference of the outputs (eval and train) and of every input gradient (a random output
gradient) must be below 1e-8 (natten: float32 and forward only, 1e-5), else the pair is marked 'different
computation' and ``PAIRS[name].differs`` says what differs.

Time: per pair and mode, ``--processes`` fresh forked processes each time ``--repeats`` interleaved rounds
(ours, peer, ours, ...) after warm-up; forward under ``inference_mode`` in eval mode, forward + backward in training
mode (backward of a random output gradient); per process the ratio ours / peer of the minimums and of the medians;
the table gives the median over the processes. Peak memory: one side per fresh process, the high-water mark of one
call above the resident set before it (``visattn.bench``: ``/proc/self/clear_refs`` + ``VmHWM``), after one
warm-up call on the same input. The speed-ups of linear, performer, linformer and local over ``full`` at 4K tokens
are printed beside the Long Range Arena figures (REFERENCES.md).

mmcv's ``mmcv.ops.CrissCrossAttention`` does not import without its compiled extension; the peer here is the einsum
form of its documentation (mmcv 2.x ``mmcv/ops/cc_attention.py``: ``energy_H = einsum('bchw,bciw->bwhi', q, k)`` with
``-inf`` on the diagonal, ``energy_W = einsum('bchw,bchj->bhwj', q, k)``, one softmax over both, then
``einsum('bciw,bhwi->bchw', v, A_H) + einsum('bchj,bhwj->bchw', v, A_W)``, ``γ·out + x``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import guarded, interleaved_times, peak_rss_mib, run_forked  # noqa: E402

import visattn  # noqa: E402

TOL, TOL_F32 = 1e-8, 1e-5
LRA_4K = {'linear': 5.6, 'performer': 5.7, 'linformer': 5.5, 'local': 5.3}


@dataclass
class Pair:
    """One side-by-side pair: ``build(shape, randomize) -> (ours, peer)``, both modules taking ``inputs(shape)``."""
    package: str  # the module the builder imports (its top-level package must be installed)
    build: Callable[[tuple[int, ...], bool], tuple[nn.Module, nn.Module]]
    kind: str  # 'map' (x [B, C, H, W]), 'tokens' (x [B, N, C]) or 'qkv' (q, k, v [B, H, N, D])
    shapes: list[tuple[int, ...]]  # the benchmark's shapes
    check_shape: tuple[int, ...]
    note: str
    modes: tuple[str, ...] = ('fwd', 'fwdbwd')
    differs: str = ''  # what differs, for a pair that is not the same function
    quick_shape: tuple[int, ...] | None = None
    positive: bool = False  # q, k positive (features of a kernel attention)
    extra: dict = field(default_factory=dict)


def perturb(m: nn.Module) -> nn.Module:
    """Parameters moved off their initial values (zero-initialised gates included), BN statistics made non-trivial."""
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for n, b in m.named_buffers():
            if n.endswith('running_mean'):
                b.copy_(torch.randn_like(b) * 0.1)
            elif n.endswith('running_var'):
                b.copy_(torch.rand_like(b) + 0.5)
    return m


def copy_by_order(src: nn.Module, dst: nn.Module, order: list[str] | None = None) -> None:
    """Copy ``src``'s state (in ``order`` of its names, default its own order) into ``dst``'s, entry by entry;
    shapes may differ only by singleton axes (mmcv's LayerNorm([C, 1, 1]))."""
    s, d = src.state_dict(), dst.state_dict()
    names = order or list(s)
    if len(names) != len(d):
        raise ValueError(f'{type(src).__name__} has {len(names)} entries, {type(dst).__name__} {len(d)}')
    with torch.no_grad():
        for a, b in zip(names, d):
            if s[a].numel() != d[b].numel():
                raise ValueError(f'{a} {tuple(s[a].shape)} does not map to {b} {tuple(d[b].shape)}')
            d[b].copy_(s[a].reshape(d[b].shape))
    dst.load_state_dict(d)


class _Attend(nn.Module):
    """A mixer's attention core, ``mixer.attend(q, k, v)`` on [B, H, N, D]: the mechanism without the projections."""

    def __init__(self, mixer: nn.Module):
        super().__init__()
        self.mixer = mixer

    def forward(self, q, k, v):
        return self.mixer.attend(q, k, v, None, None, False)


class _Fn(nn.Module):
    """A function of (q, k, v) as a module (a peer's attention core)."""

    def __init__(self, fn: Callable, inner: nn.Module | None = None):
        super().__init__()
        self.fn, self.inner = fn, inner

    def forward(self, *args):
        return self.fn(*args)


class _NCHWTokens(nn.Module):
    """A token module on NCHW maps: [B, C, H, W] -> [B, HW, C] -> module -> back (permutes counted)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        B, C, H, W = x.shape
        return self.inner(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(B, C, H, W)


# ----- peers written here: a plain unfold SASA (the paper's eq. 3), mmcv's einsum criss-cross -----

class UnfoldSasa(nn.Module):
    """SASA by unfold, straight from eq. 3 of the paper: ``y_ij = Σ_ab softmax(q_ijᵀ(k_ab + r_{a-i,b-j})) v_ab``
    over the zero-padded k×k neighbourhood with the padded keys masked (as ours); the weights of ``ours``."""

    def __init__(self, ours: nn.Module):
        super().__init__()
        self.ours = ours

    def forward(self, x):
        m = self.ours
        B, _, H, W = x.shape
        k, N, D = m.kernel_size, m.num_heads, m.head_dim
        q, key, v = m.qkv(x).chunk(3, dim=1)
        key = nn.functional.unfold(key, k, padding=k // 2).view(B, N, D, k * k, H * W)
        v = nn.functional.unfold(v, k, padding=k // 2).view(B, N, D, k * k, H * W)
        rel = m.relative_embeddings().transpose(1, 2)[None, ..., None]  # [1, N, D, k², 1]
        logits = (q.reshape(B, N, D, 1, H * W) * (key + rel)).sum(2) * m.scale  # [B, N, k², HW]
        valid = nn.functional.unfold(x.new_ones(1, 1, H, W), k, padding=k // 2)  # [1, k², HW]
        logits = logits.masked_fill(valid == 0, float('-inf'))
        out = (logits.softmax(2).unsqueeze(2) * v).sum(3)  # [B, N, D, HW]
        return m.pool(out.reshape(B, N * D, H, W))


class MmcvCrissCross(nn.Module):
    """mmcv's criss-cross attention in the einsum form of its documentation (see the module docstring)."""

    def __init__(self, channels: int):
        super().__init__()
        self.query_conv = nn.Conv2d(channels, channels // 8, 1)
        self.key_conv = nn.Conv2d(channels, channels // 8, 1)
        self.value_conv = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        H = x.shape[2]
        q, k, v = self.query_conv(x), self.key_conv(x), self.value_conv(x)
        diag = torch.diag(x.new_full((H,), float('-inf')))  # [H, H]: the position itself counted once (in W)
        energy_h = torch.einsum('bchw,bciw->bwhi', q, k) + diag
        energy_w = torch.einsum('bchw,bchj->bhwj', q, k)
        attn = torch.softmax(torch.cat([energy_h.permute(0, 2, 1, 3), energy_w], dim=-1), dim=-1)  # [B, H, W, H+W]
        out = torch.einsum('bciw,bhwi->bchw', v, attn[..., :H])
        out = out + torch.einsum('bchj,bhwj->bchw', v, attn[..., H:])
        return self.gamma * out + x


class _ExternalShell(nn.Module):
    """Ours' 1×1 conv in, conv + BN out, residual and ReLU, around External-Attention-pytorch's core on tokens."""

    def __init__(self, ours: nn.Module, core: nn.Module):
        super().__init__()
        self.ours, self.core = ours, _NCHWTokens(core)

    def forward(self, x):
        o = self.ours
        return nn.functional.relu(x + o.norm(o.conv_out(self.core(o.conv_in(x)))))


# ----- builders -----

def _build_sasa(shape, randomize):
    ours = visattn.create_attn('sasa', shape[1], kernel_size=7, num_heads=8)
    if randomize:
        perturb(ours)
    return ours, UnfoldSasa(ours)


def _build_halo(shape, randomize):
    from timm.layers.halo_attn import HaloAttn as TimmHalo

    from visattn.layers.halo import HaloAttn
    theirs = TimmHalo(shape[1], shape[1], feat_size=shape[2:], num_heads=8, block_size=8, halo_size=3)
    if randomize:
        perturb(theirs)
    return HaloAttn.from_timm(theirs), theirs


def _build_nl_timm(shape, randomize):
    from timm.layers.non_local_attn import NonLocalAttn
    theirs = NonLocalAttn(shape[1])
    if randomize:
        perturb(theirs)
    rd = theirs.t.out_channels
    ours = visattn.create_attn('nl', shape[1], rd_channels=rd, scaled=True)
    copy_by_order(theirs, ours)
    with torch.no_grad():  # timm scales the logits by C^-1/2, ours by rd^-1/2: the difference folded into theta
        ours.theta.weight.mul_((rd / shape[1]) ** 0.5)
        ours.theta.bias.mul_((rd / shape[1]) ** 0.5)
    return ours, theirs


def _build_nl_mmcv(shape, randomize):
    from mmcv.cnn.bricks import NonLocal2d
    theirs = NonLocal2d(shape[1])
    if randomize:
        perturb(theirs)
    ours = visattn.create_attn('nl', shape[1], scaled=True, norm_layer=None)
    order = ['theta.conv.weight', 'theta.conv.bias', 'phi.conv.weight', 'phi.conv.bias', 'g.conv.weight',
             'g.conv.bias', 'conv_out.conv.weight', 'conv_out.conv.bias']
    copy_by_order(theirs, ours, order)
    return ours, theirs


def _build_gc_mmcv(shape, randomize):
    from mmcv.cnn.bricks import ContextBlock
    theirs = ContextBlock(shape[1], 1 / 16)
    if randomize:
        perturb(theirs)
    ours = visattn.create_attn('gc', shape[1])
    copy_by_order(theirs, ours)
    return ours, theirs


def _build_cc(shape, randomize):
    theirs = MmcvCrissCross(shape[1])
    if randomize:
        perturb(theirs)
    ours = visattn.create_attn('cc', shape[1], recurrence=1)
    copy_by_order(theirs, ours, ['gamma'] + [n for n in theirs.state_dict() if n != 'gamma'])
    return ours, theirs


def _build_external(shape, randomize):
    from fightingcv_attention.attention.ExternalAttention import ExternalAttention as FcvExternal
    ours = visattn.create_attn('external', shape[1])
    core = FcvExternal(shape[1], S=ours.num_slots)
    if randomize:
        perturb(ours)
    with torch.no_grad():
        core.mk.weight.copy_(ours.mk.weight.flatten(1))
        core.mv.weight.copy_(ours.mv.weight.flatten(1))
    return ours, _ExternalShell(ours, core)


def _build_attention(shape, randomize):
    from timm.models.vision_transformer import Attention
    theirs = Attention(shape[2], num_heads=8)
    if randomize:
        perturb(theirs)
    ours = visattn.create_mixer('full', shape[2], num_heads=8)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _build_nystrom(shape, randomize):
    from nystrom_attention import NystromAttention
    dim = shape[2]
    theirs = NystromAttention(dim, dim_head=dim // 8, heads=8, num_landmarks=64, pinv_iterations=6)
    if randomize:
        perturb(theirs)
    ours = visattn.create_mixer('nystrom', dim, num_heads=8, num_landmarks=64, pinv_iterations=6)
    copy_by_order(theirs, ours, ['to_qkv.weight', 'to_out.0.weight', 'to_out.0.bias', 'res_conv.weight'])
    return ours, theirs


def _build_linformer(shape, randomize):
    from linformer import LinformerSelfAttention
    n, dim = shape[1], shape[2]
    theirs = LinformerSelfAttention(dim, seq_len=n, k=min(256, n), heads=8)
    if randomize:
        perturb(theirs)
    ours = visattn.create_mixer('linformer', dim, num_heads=8, seq_len=n, k=min(256, n))
    with torch.no_grad():
        ours.qkv.weight.copy_(torch.cat([theirs.to_q.weight, theirs.to_k.weight, theirs.to_v.weight]))
        ours.proj_e.copy_(theirs.proj_k.T[None])
        ours.proj_f.copy_(theirs.proj_v.T[None])
        ours.proj.weight.copy_(theirs.to_out.weight)
        ours.proj.bias.copy_(theirs.to_out.bias)
    return ours, theirs


def _build_performer(shape, randomize):
    from performer_pytorch import FastAttention
    d = shape[3]
    theirs = FastAttention(d, nb_features=max(1, round(d * __import__('math').log(d))))
    ours = visattn.create_mixer('performer', d * shape[1], num_heads=shape[1], feature_redraw_interval=None)
    with torch.no_grad():
        ours.projection.copy_(theirs.projection_matrix)
    return _Attend(ours), theirs


def _build_local(shape, randomize):
    from local_attention import LocalAttention
    w = 257 if shape[2] >= 1024 else 17
    theirs = LocalAttention(window_size=w // 2, look_backward=1, look_forward=1, exact_windowsize=True,
                            use_rotary_pos_emb=False, autopad=True)
    ours = visattn.create_mixer('local', shape[3] * shape[1], num_heads=shape[1], window=w)
    return _Attend(ours), theirs


def _build_reformer(shape, randomize):
    from reformer_pytorch import LSHSelfAttention
    dim = shape[2]
    bucket = 64 if shape[1] >= 1024 else 8
    theirs = LSHSelfAttention(dim, heads=8, bucket_size=bucket, n_hashes=4)
    if randomize:
        perturb(theirs)
    ours = visattn.create_mixer('reformer', dim, num_heads=8, bucket_size=bucket, n_hashes=4)
    return ours, theirs


def _build_fla_linear(shape, randomize):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        from fla.ops.linear_attn.naive import naive_chunk_linear_attn
    from visattn.ops import linear_attention
    scale = shape[3] ** -0.5

    def ours(q, k, v):  # fla's normalised causal linear attention: (s·q)·S_i / ((s·q)·z_i + 1e-10)
        return linear_attention(q * scale, k, v, causal=True, eps=1e-10)

    def peer(q, k, v):  # fla's layout [B, T, H, D], the transposes counted
        t = [x.transpose(1, 2) for x in (q, k, v)]
        return naive_chunk_linear_attn(*t, scale=scale, normalize=True).transpose(1, 2)
    return _Fn(ours), _Fn(peer)


def _build_blocks_2d(name):
    def build(shape, randomize):
        from bench_blocks_2d import build_pair
        return build_pair(name, shape[1], shape[2], shape[3], randomize=randomize)
    return build


def _build_gating(name):
    def build(shape, randomize):
        from bench_gating import block_pairs
        ours, theirs = block_pairs(shape[1])[name]
        if randomize and name != 'sk':
            perturb(theirs)
            ours.load_state_dict(theirs.state_dict())
        return ours, theirs
    return build


MAP_S, MAP_L = (8, 256, 32, 32), (2, 512, 64, 64)
PAIRS: dict[str, Pair] = {
    'sasa': Pair('torch', _build_sasa, 'map', [MAP_S], (2, 16, 9, 11),
                 'a plain unfold SASA written here from eq. 3 (padded keys masked), k=7, 8 heads'),
    'halo': Pair('timm', _build_halo, 'map', [MAP_S], (2, 32, 16, 16),
                 'timm.layers.HaloAttn(b=8, h=3, 8 heads); ours HaloAttn.from_timm'),
    'cc': Pair('torch', _build_cc, 'map', [MAP_L], (2, 16, 7, 9),
               "mmcv's einsum criss-cross (documented form, written here); ours cc, recurrence=1"),
    'external': Pair('fightingcv_attention.attention.ExternalAttention', _build_external, 'map',
                     [MAP_L, (2, 512, 97, 97)], (2, 16, 7, 9),
                     "External-Attention-pytorch's ExternalAttention (S=64) on tokens inside ours' conv/BN/ReLU "
                     'shell, permutes counted'),
    'nl_timm': Pair('timm', _build_nl_timm, 'map', [MAP_S], (2, 16, 7, 9),
                    'timm.layers.NonLocalAttn (rd 1/8, scaled); ours nl(rd_channels, scaled=True), timm\'s C^-1/2 '
                    'logit scale folded into theta (ours scales by rd^-1/2)',
                    differs='agrees to ~5e-8 in float64, not 1e-8 (mmcv\'s NonLocal2d, the same formula, agrees '
                            'with ours to 4e-16); the residual gap is not traced'),
    'nl_mmcv': Pair('mmcv.cnn.bricks', _build_nl_mmcv, 'map', [MAP_S], (2, 16, 7, 9),
                    'mmcv.cnn.bricks.NonLocal2d (embedded gaussian, scaled, no norm); ours nl(scaled, norm None)'),
    'gc_mmcv': Pair('mmcv.cnn.bricks', _build_gc_mmcv, 'map', [MAP_S], (2, 32, 7, 9),
                    'mmcv.cnn.bricks.ContextBlock(ratio 1/16, att pooling, channel_add)'),
    'attention': Pair('timm', _build_attention, 'tokens', [(2, 1024, 256)], (2, 63, 32),
                      'timm.models.vision_transformer.Attention(8 heads); ours full'),
    'nystrom': Pair('nystrom_attention', _build_nystrom, 'tokens', [(1, 1024, 256), (1, 4096, 256)], (2, 128, 32),
                    'nystrom_attention.NystromAttention(m=64, 6 iterations, conv 33); ours nystrom',
                    differs='the start Z0 of the pseudo-inverse iteration: nystrom-attention divides by the largest '
                            'row and column sums over the whole batch and all heads, ours per matrix (the paper\'s '
                            'per-matrix norms); with an exact pseudo-inverse in both the outputs agree to 6e-10. The '
                            'same operations and cost'),
    'linformer': Pair('linformer', _build_linformer, 'tokens', [(1, 1024, 256), (1, 4096, 256)], (2, 63, 32),
                      'linformer.LinformerSelfAttention(k=256, headwise sharing); ours linformer'),
    'performer': Pair('performer_pytorch', _build_performer, 'qkv', [(1, 8, 1024, 32), (1, 8, 4096, 32)],
                      (2, 2, 63, 16), 'performer_pytorch.FastAttention (m = D ln D, projection mapped); ours attend',
                      differs='performer-pytorch adds 1e-4 to every random feature and stabilises the keys by their '
                              'global max (ours: no offset, exact)'),
    'local': Pair('local_attention', _build_local, 'qkv', [(1, 8, 1024, 32), (1, 8, 4096, 32)], (2, 2, 64, 16),
                  'local_attention.LocalAttention(window 128, look back/forward 1, exact_windowsize, no rotary); ours '
                  'local window 257 (checked at N a multiple of its window: at other N its autopad lets the last '
                  'queries see zero keys)'),
    'reformer': Pair('reformer_pytorch', _build_reformer, 'tokens', [(1, 1024, 256)], (2, 64, 32),
                     'reformer_pytorch.LSHSelfAttention(bucket 64, 4 hashes); ours reformer(bucket 64, 4 hashes)',
                     differs='the random rotations differ (reformer-pytorch draws new ones at every call), and its '
                             'projections, chunking and duplicate handling are laid out differently: timed only'),
    'linear_fla': Pair('fla.ops.linear_attn.naive', _build_fla_linear, 'qkv',
                       [(1, 8, 1024, 32), (1, 8, 4096, 32)], (2, 2, 128, 16),
                       "fla.ops.linear_attn.naive.naive_chunk_linear_attn (causal, normalize=True); ours "
                       'visattn.ops.linear_attention(causal, eps=1e-10)', positive=True),
}
for _name, _note in [('window', "timm's Swin block pieces"), ('window_v2', "timm's Swin v2 block pieces"),
                     ('lambda', 'timm LambdaLayer'), ('bottleneck', 'timm BottleneckAttn'),
                     ('bat', 'timm BatNonLocalAttn'), ('outlook', 'timm VOLO OutlookAttention (NHWC)'),
                     ('mobilevit', 'timm MobileVitBlock'), ('poolformer', 'timm metaformer Pooling')]:
    _shape = (8, 256, 28, 28) if _name in ('window', 'window_v2', 'bat') else MAP_S
    PAIRS[_name] = Pair('timm', _build_blocks_2d(_name), 'map', [_shape], (2, 64, 14, 14), _note + ' (bench_blocks_2d)')
PAIRS['na'] = Pair('natten', _build_blocks_2d('na'), 'map', [MAP_S], (2, 64, 14, 14),
                   'natten.NeighborhoodAttention2D(8 heads, k=7), NHWC, permutes counted; float32, forward only',
                   modes=('fwd',))
for _name in ['se', 'eca', 'cbam', 'gc', 'ese', 'ecam', 'ceca', 'ge', 'lcbam', 'coord', 'scoord', 'ela', 'strip',
              'splat']:
    PAIRS[_name] = Pair('timm', _build_gating(_name), 'map', [(8, 256, 56, 56)], (2, 64, 9, 11),
                        f'timm module of bench_gating.block_pairs({_name!r})')
PAIRS['gc'].differs = "timm's LayerNorm2d has eps 1e-6, ours (and mmcv's ContextBlock, gc_mmcv) 1e-5"
PAIRS['sk'] = Pair('timm', _build_gating('sk'), 'map', [(8, 256, 56, 56)], (2, 64, 9, 11),
                   'timm SelectiveKernel([3, 5], groups 32)', differs='the parameter layout differs (no state-dict '
                   'mapping here; tests/layers check the equality): timed only')


def available(name: str) -> bool:
    return importlib.util.find_spec(PAIRS[name].package.split('.')[0]) is not None


def preimport(names: list[str]) -> None:
    """Import the peers' modules once in the parent (no torch op runs), so that the forked cases do not each pay
    for imports that take seconds (mmcv-lite pulls mmengine, flash-linear-attention pulls transformers)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for mod in {PAIRS[n].package for n in names} | {'bench_blocks_2d', 'bench_gating'}:
            importlib.import_module(mod)


def make_inputs(pair: Pair, shape: tuple[int, ...], dtype: torch.dtype, grad: bool) -> list[torch.Tensor]:
    if pair.kind == 'qkv':
        xs = [torch.randn(shape, dtype=dtype) for _ in range(3)]
        if pair.positive:
            xs[0], xs[1] = xs[0].abs() + 0.1, xs[1].abs() + 0.1
    else:
        xs = [torch.randn(shape, dtype=dtype)]
    return [x.requires_grad_(grad) for x in xs]


def check_pair(name: str) -> dict:
    """Max abs differences (eval out, train out, input gradients) of the pair with perturbed, mapped weights."""
    pair = PAIRS[name]
    torch.manual_seed(42)
    dtype = torch.float32 if name == 'na' else torch.float64
    ours, theirs = pair.build(pair.check_shape, True)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    diffs = {}
    xs = make_inputs(pair, pair.check_shape, dtype, False)
    with torch.no_grad():
        torch.manual_seed(0)
        a = ours.eval()(*xs)
        torch.manual_seed(0)
        diffs['eval out'] = (a - theirs.eval()(*xs)).abs().max().item()
    if 'fwdbwd' in pair.modes:
        xa = [x.clone().requires_grad_() for x in xs]
        xb = [x.clone().requires_grad_() for x in xs]
        torch.manual_seed(0)
        a = ours.train()(*xa)
        torch.manual_seed(0)
        b = theirs.train()(*xb)
        diffs['train out'] = (a - b).abs().max().item()
        g = torch.randn_like(a)
        ga, gb = torch.autograd.grad(a, xa, g), torch.autograd.grad(b, xb, g)
        diffs['grad in'] = max((u - w).abs().max().item() for u, w in zip(ga, gb))
    return diffs


def _steps(pair: Pair, ours: nn.Module, theirs: nn.Module, shape, mode: str) -> dict[str, Callable[[], None]]:
    fwd = mode == 'fwd'
    xs = make_inputs(pair, shape, torch.float32, not fwd)
    mods = {'ours': ours.train(not fwd), 'peer': theirs.train(not fwd)}
    g = None
    if not fwd:
        with torch.no_grad():
            g = torch.randn_like(ours(*xs))

    def step(m):
        def run() -> None:
            if fwd:
                with torch.inference_mode():
                    m(*xs)
            else:
                for x in xs:
                    x.grad = None
                m.zero_grad(set_to_none=True)
                m(*xs).backward(g)
        return run
    return {side: step(m) for side, m in mods.items()}


def _worker(spec: dict, conn) -> None:
    torch.set_num_threads(spec['threads'])
    torch.manual_seed(0)
    pair = PAIRS[spec['name']]
    if spec.get('check'):
        conn.send(check_pair(spec['name']))
        return
    shape = tuple(spec['shape'])
    ours, theirs = pair.build(shape, False)
    steps = _steps(pair, ours, theirs, shape, spec['mode'])
    if spec.get('side'):
        fn = steps[spec['side']]
        fn()  # warm-up on the same input: the lazily built tables and pools exist before the baseline
        conn.send({'peak_mib': peak_rss_mib(fn)})
        return
    t = interleaved_times([steps['ours'], steps['peer']], spec['repeats'], spec['warmup'])
    conn.send({'ours': t[0], 'peer': t[1]})


WORKER = guarded(_worker)


def _full_worker(spec: dict, conn) -> None:
    """Forward time of a mixer and of ``full`` at N (for the speed-ups over full), interleaved."""
    torch.set_num_threads(spec['threads'])
    n, dim = spec['n'], 256
    kw = visattn.mixers.length_kwargs(spec['name'], n)
    extra = {'window': 257} if spec['name'] == 'local' else {}
    m = visattn.create_mixer(spec['name'], dim, num_heads=8, **kw, **extra).eval()
    full = visattn.create_mixer('full', dim, num_heads=8).eval()
    x = torch.randn(1, n, dim)

    def step(mod):
        def run() -> None:
            with torch.inference_mode():
                mod(x)
        return run
    t = interleaved_times([step(m), step(full)], spec['repeats'], 1)
    conn.send({'ours': t[0], 'full': t[1]})


def run_checks(names: list[str], args) -> dict[str, bool]:
    print('\n## Same-function checks\n\nperturbed peer weights mapped into ours, float64 (na: float32), seed 42; '
          f'max abs difference of eval output, train output, input gradients; same if all < {TOL:g} '
          f'(na {TOL_F32:g})\n')
    print('| pair | check input | max abs diff | verdict | peer |\n|---|---|---|---|---|')
    same = {}
    for name in names:
        pair = PAIRS[name]
        d = run_forked(WORKER, dict(name=name, check=True, threads=args.threads), args.timeout, f'{name} check')
        tol = TOL_F32 if name == 'na' else TOL
        ok = d is not None and max(d.values()) < tol
        same[name] = ok
        diffs = '-' if d is None else ', '.join(f'{k} {v:.1e}' for k, v in d.items())
        verdict = f'same (< {tol:g})' if ok else 'different computation' + (f': {pair.differs}' if pair.differs else '')
        print(f'| {name} | {list(pair.check_shape)} | {diffs} | {verdict} | {pair.note} |', flush=True)
    return same


def _ratio_cells(runs: list[dict], j: Callable[[list[float]], float]) -> tuple[str, float]:
    ratios = sorted(j(r['ours']) / j(r['peer']) for r in runs)
    med = statistics.median(ratios)
    return f'{med:.2f} ({ratios[0]:.2f}–{ratios[-1]:.2f})', med


def run_timing(names: list[str], same: dict[str, bool], args) -> list[tuple[str, str, float, float]]:
    print(f'\n## Time and peak memory\n\n{args.processes} fresh processes per case, {args.repeats} interleaved '
          f'repeats each after {args.warmup} warm-up; ratio = ours / peer (below 1: ours faster), median over the '
          'processes (range); ms: median over the processes of each side\'s min / median; peak: one call, one side '
          'per fresh process\n')
    print('| pair | shape | mode | ours min ms | peer min ms | ratio by min | ours median ms | peer median ms | '
          'ratio by median | ours peak MiB | peer peak MiB |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|')
    behind = []
    for name in names:
        pair = PAIRS[name]
        shapes = [pair.quick_shape or pair.check_shape] if args.quick else pair.shapes
        for shape in shapes:
            for mode in pair.modes:
                spec = dict(name=name, shape=list(shape), mode=mode, threads=args.threads, repeats=args.repeats,
                            warmup=args.warmup)
                label = f'{name} {list(shape)} {mode}'
                runs = [r for r in (run_forked(WORKER, spec, args.timeout, label) for _ in range(args.processes))
                        if r is not None]
                if not runs:
                    continue
                mem = {s: run_forked(WORKER, dict(spec, side=s), args.timeout, f'{label} {s} memory')
                       for s in ('ours', 'peer')}
                cmin, rmin = _ratio_cells(runs, min)
                cmed, rmed = _ratio_cells(runs, statistics.median)
                ms = {s: (statistics.median(min(r[s]) for r in runs) * 1e3,
                          statistics.median(statistics.median(r[s]) for r in runs) * 1e3) for s in ('ours', 'peer')}
                peak = {s: '-' if m is None or m['peak_mib'] is None else f"{m['peak_mib']:.1f}"
                        for s, m in mem.items()}
                tag = '' if same.get(name) else ' (different computation)'
                print(f"| {name}{tag} | {list(shape)} | {'fwd+bwd' if mode == 'fwdbwd' else 'fwd'} | "
                      f"{ms['ours'][0]:.1f} | {ms['peer'][0]:.1f} | {cmin} | {ms['ours'][1]:.1f} | "
                      f"{ms['peer'][1]:.1f} | {cmed} | {peak['ours']} | {peak['peer']} |", flush=True)
                if same.get(name) and max(rmin, rmed) > 1.0:
                    behind.append((name, f'{list(shape)} {mode}', rmin, rmed))
                mem_o, mem_p = mem['ours'], mem['peer']
                if same.get(name) and mem_o and mem_p and mem_o['peak_mib'] and mem_p['peak_mib'] and \
                        mem_o['peak_mib'] > 1.05 * mem_p['peak_mib'] + 1:
                    behind.append((name, f'{list(shape)} {mode} memory', mem_o['peak_mib'], mem_p['peak_mib']))
    return behind


def run_lra(args) -> None:
    n = 512 if args.quick else 4096
    print(f'\n## Speed-up over full at N = {n} (forward, dim 256, 8 heads, batch 1)\n\n'
          '| mixer | speed-up by min | speed-up by median | LRA 4K (TPU) |\n|---|---:|---:|---:|')
    for name, lra in LRA_4K.items():
        spec = dict(name=name, n=n, threads=args.threads, repeats=args.repeats)
        runs = [r for r in (run_forked(guarded(_full_worker), spec, args.timeout, f'{name} vs full')
                            for _ in range(args.processes)) if r is not None]
        if not runs:
            continue
        smin = statistics.median(min(r['full']) / min(r['ours']) for r in runs)
        smed = statistics.median(statistics.median(r['full']) / statistics.median(r['ours']) for r in runs)
        print(f'| {name} | {smin:.1f}x | {smed:.1f}x | {lra}x |', flush=True)


def machine() -> str:
    try:
        lscpu = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
        model = next((ln.split(':', 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith('Model name')), '?')
    except OSError:
        model = platform.processor() or '?'
    load = ' '.join(f'{v:.1f}' for v in os.getloadavg())
    return (f'{model}, {os.cpu_count()} cores visible; torch {torch.__version__}, {torch.get_num_threads()} threads; '
            f'load average (1, 5, 15 min) at the start: {load}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--check', action='store_true', help='the same-function checks only')
    parser.add_argument('--quick', action='store_true', help='check-sized shapes, few repeats and processes')
    parser.add_argument('--names', nargs='+', default=None, help=f'pairs (default all): {" ".join(PAIRS)}')
    parser.add_argument('--processes', type=int, default=None, help='fresh processes per case (default 3)')
    parser.add_argument('--repeats', type=int, default=None, help='interleaved repeats per process (default 7)')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch default)')
    parser.add_argument('--timeout', type=float, default=300, help='seconds allowed to one process')
    parser.add_argument('--no-lra', action='store_true', help='skip the speed-ups over full')
    args = parser.parse_args()
    args.threads = args.threads or torch.get_num_threads()
    args.processes = args.processes or (1 if args.quick else 3)
    args.repeats = args.repeats or (2 if args.quick else 7)
    names = args.names or list(PAIRS)
    for n in names:
        if n not in PAIRS:
            parser.error(f'unknown pair {n!r}; known: {" ".join(PAIRS)}')
    print(f'# CPU: visattn vs its peers\n\nMachine: {machine()}')
    missing = [n for n in names if not available(n)]
    for n in missing:
        print(f'\nnote: {n}: {PAIRS[n].package} does not import here (pip install -e ".[bench]"): skipped')
    names = [n for n in names if n not in missing]
    preimport(names)
    same = run_checks(names, args)
    if args.check:
        return
    behind = run_timing(names, same, args)
    if not args.no_lra:
        run_lra(args)
    print('\n## Same-function pairs above 1.0 (time: ratio by min / by median; memory: ours / peer MiB)\n')
    for name, case, a, b in behind:
        print(f'- {name} {case}: {a:.2f} / {b:.2f}')
    if not behind:
        print('- none')


if __name__ == '__main__':
    main()
