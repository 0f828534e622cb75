"""CPU time and peak memory of the context and local 2-D blocks, how both grow when H and W double, and (``--peers``)
how the blocks that have a reference implementation compare with it side by side.

    python benchmarks/bench_blocks_2d.py            # [2, 512, 97, 97] and [8, 256, 56, 56]; growth 48² -> 96²
    python benchmarks/bench_blocks_2d.py --quick    # tiny shapes, a smoke run
    python benchmarks/bench_blocks_2d.py --names cc efficient --threads 8
    python benchmarks/bench_blocks_2d.py --peers --timeout 60    # ours vs timm / natten only

Blocks are built by registry name with their defaults (``visattn.create_attn(name, C)``), plus what ``BLOCK_ARGS``
gives (printed in the output; cot's fusion BatchNorm needs a batch of 2 in training, so its growth cases use B = 2);
a name that is not registered is skipped with a note. Every case runs in a fresh process, forked from the parent
after torch and visattn are imported (and before the parent runs any torch op), so that each starts with its own
high-water mark; a case that gives no result within ``--timeout`` seconds is skipped with a note:

- time: median of ``--repeats`` calls after warm-up, forward under ``torch.no_grad()`` in eval mode, and
  forward + backward (of ``out.sum()``) in training mode;
- peak memory: the process's resident-set high-water mark (``getrusage(RUSAGE_SELF).ru_maxrss``) after the first
  timed call, minus the resident set just before it (module, input, and the torch runtime warmed up by one call on
  a 5×5 input, already in place). It counts
  every allocation torch makes through the system allocator (activations, temporaries, gradients), which
  ``tracemalloc`` cannot see. It is at least the true peak of the call, rounded up by the allocator's reuse
  of freed pages, so small cases (a few MB) read as noise.

Growth: the ratio of time and memory at 2H×2W over H×W, printed beside the ratio the mechanism's complexity
predicts (``EXPECTED_GROWTH``): cc and axial (whole-axis span) HW·(H+W), 8×; sasa, halo (k² and b fixed), efficient,
ema, external (K, S fixed) and da_channel HW, 4×; nl, da and da_position (HW)², 16× in time. In memory nl predicts 4×,
not 16×: it runs in ``scaled_dot_product_attention``, whose flash kernels never hold the (HW)² matrix; da's position
branch does (its value is wider than its query, which the fused CPU kernel does not take). The memory of small
cases is dominated by HW·C activations, which grow 4×. Second wave:

- 4× (linear in HW: a fixed window, kernel, band count or rank): na, window, window_v2 (k², M² fixed), lambda (its
  r×r position lambda and the [k, v] content lambda), cot, outlook, acmix (k², k_att² fixed), poolformer, shift,
  s2mlp, bat (b×b band attention, b fixed: HW·C·b), ham (NMF with rank r and K steps fixed: HW·r·d·K), lightnl
  (r = s = 1 takes the associative order x_c (x_scᵀ x_s): HW·C²), kronecker (KAO_QKV: HW·C + (H+W)²·C), gfnet and
  afno (HW log HW for the FFTs, ~4.7× from 48² to 96², plus per-frequency channel work HW·C);
- smlp: HW·(H+W)·C for the row and column maps, 8× in time; it holds no HW·(H+W) tensor, 4× in memory;
- issa: O(HW·(HW/P + P)·C) with the block P = 8×8 fixed: 16× asymptotically (about 8× from 48² to 96², where
  HW/P + P goes from 100 to 208); the steps run in ``scaled_dot_product_attention``, 4× in memory;
- mobilevit: attention of HW/p² patches for each of the p² pixel positions, (HW/p²)²·p² = (HW)²/p², 16× in time
  (its convolutions and MLPs are 4×); in ``scaled_dot_product_attention``, 4× in memory;
- bottleneck: (HW)², 16× in time, and 16× in memory too: its relative logits are a [B, heads, HW, HW] float mask
  handed to ``scaled_dot_product_attention`` (the flash path saves the softmax, not the mask);
- deformable: dense attention of HW queries over HW sampled keys at r = 1, with a [B, heads, HW, HW] bias sampled
  by ``grid_sample``, computed as baddbmm + softmax on a CPU: 16× in time and memory.

Peers (``--peers``): for window, window_v2, lambda, bottleneck, bat, outlook, mobilevit, poolformer (timm) and na
(natten, when ``import natten`` works; else a note), both modules with the same weights, in one forked process per
case, timed alternately (ours, peer, ours, peer, ...): forward under no_grad in eval mode, forward + backward in
training mode with the backward of a random output gradient (not ``.sum()``); min and median of the repeats and
their ratio ours / peer, at [8, 256, 56, 56] and [2, 512, 97, 97] (98×98 for window, window_v2 and bat, which
timm only runs at multiples of the window or band). Each pair is first checked to compute the same function
(perturbed weights, float64, [2, 64, 14, 14]: max abs difference of the eval and train outputs and of the input
gradient, < 1e-8, else it is marked 'different computation'; natten's CPU path has only float32 and no backward,
so na is forward only, checked to 1e-5). Peak memory is measured per side in its own fresh process as above.
``PEER_NOTES`` (printed) says how each peer is called; timm's channels-last modules (outlook's ``OutlookAttention``,
natten) get the NCHW <-> NHWC permutes counted in their time, as a user with NCHW maps pays them.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from multiprocessing.connection import Connection

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import guarded  # noqa: E402
from _harness import rss_now_kb as _rss_now_kb  # noqa: E402
from _harness import run_forked as _run_forked  # noqa: E402

FIRST_WAVE = ['cc', 'da', 'da_position', 'da_channel', 'sasa', 'halo', 'axial', 'efficient', 'nl', 'ema', 'external']
SECOND_WAVE = ['na', 'window', 'window_v2', 'lambda', 'bottleneck', 'bat', 'issa', 'ham', 'lightnl', 'kronecker', 'cot',
               'outlook', 'acmix', 'deformable', 'mobilevit', 'gfnet', 'afno', 'poolformer', 'shift', 's2mlp', 'smlp']
NAMES = FIRST_WAVE + SECOND_WAVE
# name -> (time, memory) ratio predicted when H and W double
EXPECTED_GROWTH = {
    'cc': (8, 8), 'axial': (8, 8), 'sasa': (4, 4), 'halo': (4, 4), 'efficient': (4, 4), 'ema': (4, 4),
    'external': (4, 4), 'da_channel': (4, 4), 'nl': (16, 4), 'da': (16, 16), 'da_position': (16, 16),
    # second wave: fixed windows / kernels / ranks are linear in HW
    'na': (4, 4), 'window': (4, 4), 'window_v2': (4, 4), 'lambda': (4, 4), 'cot': (4, 4), 'outlook': (4, 4),
    'acmix': (4, 4), 'poolformer': (4, 4), 'shift': (4, 4), 's2mlp': (4, 4), 'bat': (4, 4), 'ham': (4, 4),
    'lightnl': (4, 4), 'kronecker': (4, 4), 'gfnet': (4, 4), 'afno': (4, 4),
    'bottleneck': (16, 16), 'deformable': (16, 16), 'mobilevit': (16, 4), 'issa': (16, 4), 'smlp': (8, 4),
}
# Arguments some blocks need at some shape, beside their registry defaults: constructor keyword arguments, and
# 'batch_at_least' (the smallest batch the block runs in training: cot's fusion BatchNorm needs 2).
BLOCK_ARGS: dict[str, dict] = {
    'cot': {'batch_at_least': 2},
}


def _ctor_args(name: str) -> dict:
    return {k: v for k, v in BLOCK_ARGS.get(name, {}).items() if k != 'batch_at_least'}


def _case_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (max(shape[0], BLOCK_ARGS.get(name, {}).get('batch_at_least', 1)), *shape[1:])


def worker(spec: dict, conn: Connection) -> None:
    """Run one case in this (forked) process and send back its figures (milliseconds, MiB)."""
    import torch

    import visattn

    torch.set_num_threads(spec['threads'])
    torch.manual_seed(0)
    shape = spec['shape']
    module = visattn.create_attn(spec['name'], shape[1], **_ctor_args(spec['name']))
    x = torch.randn(*shape)
    if spec['mode'] == 'fwd':
        module.eval()

        def step() -> None:
            with torch.no_grad():
                module(x)
    else:
        module.train()
        x.requires_grad_(True)

        def step() -> None:
            x.grad = None
            module.zero_grad(set_to_none=True)
            module(x).sum().backward()

    tiny = torch.randn(_case_shape(spec['name'], (1,))[0], shape[1], min(5, shape[2]), min(5, shape[3]),
                       requires_grad=spec['mode'] != 'fwd')
    if spec['mode'] == 'fwd':
        with torch.no_grad():
            module(tiny)  # loads torch's lazily initialised kernels and pools before the baseline
    else:
        module(tiny).sum().backward()
        module.zero_grad(set_to_none=True)
    base_kb = _rss_now_kb()
    step()
    peak_mib = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb) / 1024
    for _ in range(spec['warmup']):
        step()
    times = []
    for _ in range(spec['repeats']):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    conn.send({'ms': statistics.median(times) * 1e3, 'peak_mib': peak_mib})


_guarded_worker = guarded(worker)


def run_case(name: str, shape: tuple[int, ...], mode: str, args: argparse.Namespace) -> dict | None:
    shape = _case_shape(name, shape)
    spec = dict(name=name, shape=list(shape), mode=mode, threads=args.threads, repeats=args.repeats,
                warmup=args.warmup)
    return _run_forked(_guarded_worker, spec, args.timeout, f'{name} {list(shape)} {mode}')


# ----- side-by-side peers -----

PEERS = ['window', 'window_v2', 'lambda', 'bottleneck', 'bat', 'outlook', 'mobilevit', 'poolformer', 'na',
         'na~window', 'na~lambda', 'na~bottleneck']
# cross pairs: our `na` (k=7, 8 heads, relative position bias) against another mechanism's timm module, the local
# attention a user would otherwise take: a different computation, compared for its cost only
CROSS = {'na~window': 'window', 'na~lambda': 'lambda', 'na~bottleneck': 'bottleneck'}
PEER_NOTES = {
    'window': "timm's SwinTransformerBlock pieces on NCHW: permute, roll, window_partition, WindowAttention with the "
              "block's SW-MSA mask, window_reverse, roll back, permute (window 7, shift 3, 8 heads)",
    'window_v2': "the same with timm's SwinTransformerV2Block pieces (window 7, shift 3, 8 heads)",
    'lambda': 'timm.layers.LambdaLayer(r=9, 4 heads, dim_head 16); ours LambdaLayer.from_timm (r=9, bias, 2x2 pool)',
    'bottleneck': 'timm.layers.BottleneckAttn(feat_size=(H, W), 4 heads); ours BottleneckAttn.from_timm',
    'bat': 'timm.layers.BatNonLocalAttn(block_size=7, groups=2, drop_rate=0); ours the same arguments',
    'outlook': 'timm.models.volo.OutlookAttention(8 heads, k=3) on channels-last input: the two permutes NCHW <-> '
               'NHWC are counted in its time (what a user with NCHW maps pays)',
    'mobilevit': 'timm.models.mobilevit.MobileVitBlock(patch_size=2, SiLU conv-norm-act as its models build it)',
    'poolformer': 'timm.models.metaformer.Pooling(pool_size=3)',
    'na': "natten.NeighborhoodAttention2D(8 heads, k=7) on NHWC (permutes counted); ours rel_pos_bias=False "
          "(natten >= 0.20 has no rpb). natten's CPU path (FlexAttention) has no backward and no float64: "
          'forward only, checked in float32',
    'na~window': "ours: na (k=7, 8 heads, rel. position bias); peer: timm's Swin window attention as in 'window'",
    'na~lambda': "ours: na (k=7, 8 heads, rel. position bias); peer: timm.layers.LambdaLayer as in 'lambda'",
    'na~bottleneck': "ours: na (k=7, 8 heads, rel. position bias); peer: timm.layers.BottleneckAttn as in "
                     "'bottleneck'",
}
# pairs run at a multiple of their window / band at the large shape (timm asserts it or pads differently)
PEER_LARGE_HW = {'window': 98, 'window_v2': 98, 'bat': 98, 'na~window': 98}


class _NCHW(nn.Module):
    """A channels-last module on NCHW maps, the permutes included."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _TimmWindows(nn.Module):
    """timm's Swin attention step on NCHW maps (H, W multiples of the window, as timm's block needs): its cyclic
    shift, ``window_partition``, ``WindowAttention`` with its block's mask, ``window_reverse``, the roll back."""

    def __init__(self, block, mod):
        super().__init__()
        self.attn, self.mod = block.attn, mod
        self.register_buffer('mask', block.attn_mask, persistent=False)
        self.window, self.shift = block.window_size, block.shift_size

    def forward(self, x):
        (wh, ww), (sh, sw) = self.window, self.shift
        B, C, H, W = x.shape
        t = x.permute(0, 2, 3, 1)
        t = torch.roll(t, (-sh, -sw), (1, 2)) if sh or sw else t
        out = self.attn(self.mod.window_partition(t, (wh, ww)).view(-1, wh * ww, C), mask=self.mask)
        out = out.view(-1, wh, ww, C)
        if self.mod.__name__.endswith('v2'):
            t = self.mod.window_reverse(out, (wh, ww), (H, W))
        else:
            t = self.mod.window_reverse(out, (wh, ww), H, W)
        t = torch.roll(t, (sh, sw), (1, 2)) if sh or sw else t
        return t.permute(0, 3, 1, 2)


def build_pair(pair: str, C: int, H: int, W: int, randomize: bool = False):
    """(ours, theirs), the same function where the pair is 'same'; ``randomize`` perturbs theirs' parameters and
    BN statistics before they are copied into ours (for the check)."""
    import functools

    import torch

    import visattn

    def perturb(m):
        if randomize:
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn_like(p) * 0.1)
                for n, b in m.named_buffers():
                    if n.endswith('running_mean'):
                        b.copy_(torch.randn_like(b) * 0.1)
                    elif n.endswith('running_var'):
                        b.copy_(torch.rand_like(b) + 0.5)
        return m

    if pair in CROSS:
        theirs = build_pair(CROSS[pair], C, H, W)[1]
        return visattn.create_attn('na', C, num_heads=8, kernel_size=7), theirs
    if pair in ('window', 'window_v2'):
        from timm.models import swin_transformer as tv1
        from timm.models import swin_transformer_v2 as tv2
        mod, cls = (tv1, tv1.SwinTransformerBlock) if pair == 'window' else (tv2, tv2.SwinTransformerV2Block)
        block = cls(C, (H, W), num_heads=8, window_size=7, shift_size=3)
        theirs = _TimmWindows(block, mod)
        perturb(theirs.attn)
        ours = visattn.create_attn(pair, C, num_heads=8, window_size=7, shift_size=3)
        ours.load_state_dict(theirs.attn.state_dict())
    elif pair == 'lambda':
        from timm.layers.lambda_layer import LambdaLayer as TimmLambda

        from visattn.layers.lambda_layer import LambdaLayer
        theirs = perturb(TimmLambda(C, C, r=9, num_heads=4, dim_head=16))
        ours = LambdaLayer.from_timm(theirs)
    elif pair == 'bottleneck':
        from timm.layers.bottleneck_attn import BottleneckAttn as TimmBottleneck

        from visattn.layers.bottleneck import BottleneckAttn
        theirs = perturb(TimmBottleneck(C, C, feat_size=(H, W), num_heads=4))
        ours = BottleneckAttn.from_timm(theirs)
    elif pair == 'bat':
        from timm.layers.non_local_attn import BatNonLocalAttn as TimmBat
        theirs = perturb(TimmBat(C, block_size=7, groups=2, drop_rate=0.))
        ours = visattn.create_attn('bat', C, block_size=7, groups=2, drop_rate=0.)
        ours.load_state_dict(theirs.state_dict())
    elif pair == 'outlook':
        from timm.models.volo import OutlookAttention
        theirs = _NCHW(perturb(OutlookAttention(C, num_heads=8, kernel_size=3, padding=1)))
        ours = visattn.create_attn('outlook', C, num_heads=8, kernel_size=3)
        ours.load_state_dict(theirs.inner.state_dict())
    elif pair == 'mobilevit':
        from timm.layers import ConvNormAct
        from timm.models.byobnet import LayerFn
        from timm.models.mobilevit import MobileVitBlock as TimmMobileVit
        layers = LayerFn(conv_norm_act=functools.partial(ConvNormAct, act_layer=torch.nn.SiLU), act=torch.nn.SiLU)
        theirs = perturb(TimmMobileVit(C, layers=layers, patch_size=2))
        ours = visattn.create_attn('mobilevit', C, patch_size=2)
        ours.load_state_dict(theirs.state_dict())
    elif pair == 'poolformer':
        from timm.models.metaformer import Pooling
        theirs, ours = Pooling(pool_size=3), visattn.create_attn('poolformer', C, pool_size=3)
    elif pair == 'na':
        import natten
        theirs = _NCHW(perturb(natten.NeighborhoodAttention2D(C, 8, 7)))
        ours = visattn.create_attn('na', C, num_heads=8, kernel_size=7, rel_pos_bias=False)
        ours.load_state_dict(theirs.inner.state_dict())
    else:
        raise KeyError(pair)
    return ours, theirs


def _peer_modes(pair: str) -> list[str]:
    return ['fwd'] if pair == 'na' else ['fwd', 'fwdbwd']


def check_pair(pair: str) -> dict:
    """Same weights, small input: max abs difference of the outputs (eval and train) and, with a random output
    gradient, of the input gradients (train); float64 (natten: float32)."""
    import torch

    if pair in CROSS:
        return {}  # a different computation: no check
    torch.manual_seed(0)
    C, H, W = 64, 14, 14  # natten's CPU path needs heads of >= 8 channels
    dtype = torch.float32 if pair == 'na' else torch.float64
    ours, theirs = build_pair(pair, C, H, W, randomize=True)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x = torch.randn(2, C, H, W, dtype=dtype)
    diffs = {}
    with torch.no_grad():
        diffs['eval out'] = (ours.eval()(x) - theirs.eval()(x)).abs().max().item()
    if 'fwdbwd' in _peer_modes(pair):
        xs = [x.clone().requires_grad_() for _ in range(2)]
        a, b = ours.train()(xs[0]), theirs.train()(xs[1])
        diffs['train out'] = (a - b).abs().max().item()
        g = torch.randn_like(a)
        (ga,), (gb,) = torch.autograd.grad(a, [xs[0]], g), torch.autograd.grad(b, [xs[1]], g)
        diffs['train grad x'] = (ga - gb).abs().max().item()
    return diffs


def peer_worker(spec: dict, conn: Connection) -> None:
    """Both sides in this process, alternating repeats; or, with spec['side'], one side's peak memory."""
    import torch

    torch.set_num_threads(spec['threads'])
    torch.manual_seed(0)
    if spec.get('check'):
        conn.send(check_pair(spec['pair']))
        return
    B, C, H, W = spec['shape']
    ours, theirs = build_pair(spec['pair'], C, H, W)
    x = torch.randn(B, C, H, W)
    fwd = spec['mode'] == 'fwd'
    mods = {'ours': ours.train(not fwd), 'peer': theirs.train(not fwd)}
    if not fwd:
        x.requires_grad_(True)
        with torch.no_grad():
            g = torch.randn_like(ours(x))  # a random output gradient (not out.sum()'s constant one)

    def step(m) -> None:
        if fwd:
            with torch.no_grad():
                m(x)
        else:
            x.grad = None
            m.zero_grad(set_to_none=True)
            m(x).backward(g)

    if spec.get('side'):
        m = mods[spec['side']]
        tiny = torch.randn(1, C, 7, 7, requires_grad=not fwd)  # kernels and pools warmed up before the baseline
        if spec['pair'] in ('window', 'window_v2', 'bottleneck') or spec['pair'] in CROSS:
            pass  # timm's modules are tied to H x W: no warm-up on either side
        elif fwd:
            with torch.no_grad():
                m(tiny)
        else:
            m(tiny).sum().backward()
            m.zero_grad(set_to_none=True)
        base_kb = _rss_now_kb()
        step(m)
        conn.send({'peak_mib': max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb) / 1024})
        return
    for _ in range(spec['warmup']):
        step(mods['ours'])
        step(mods['peer'])
    times = {'ours': [], 'peer': []}
    for _ in range(spec['repeats']):
        for side in ('ours', 'peer'):
            t0 = time.perf_counter()
            step(mods[side])
            times[side].append((time.perf_counter() - t0) * 1e3)
    conn.send(times)


_guarded_peer_worker = guarded(peer_worker)


def run_peers(args: argparse.Namespace) -> None:
    import importlib.util

    pairs = [p for p in args.peer_names if p in PEERS]
    if 'na' in pairs and importlib.util.find_spec('natten') is None:
        print('note: natten is not installed (import natten fails): na has no peer here')
        pairs.remove('na')
    base = dict(threads=args.threads, repeats=args.repeats, warmup=args.warmup)
    print(f'\npeers: ours vs the reference implementation in the same process, alternating repeats (ours, peer, '
          f'ours, ...), {args.repeats} repeats after {args.warmup} warm-up each; fwd: eval, no_grad; fwd+bwd: train, '
          'backward of a random output gradient; ratio = ours / peer (< 1: ours faster); peak memory: one side per '
          'fresh process, ru_maxrss high-water minus RSS before the first call')
    same = {}
    print('\nsame-function check (same weights, perturbed; input [2, 64, 14, 14]; float64 unless noted)')
    print('| pair | max abs diff | verdict | peer |\n|---|---|---|---|')
    for pair in pairs:
        d = _run_forked(_guarded_peer_worker, dict(base, pair=pair, check=True), args.timeout, f'{pair} check')
        tol = 1e-5 if pair == 'na' else 1e-8
        ok = d is not None and bool(d) and max(d.values()) < tol
        same[pair] = ok
        diffs = '-' if not d else ', '.join(f'{k} {v:.1e}' for k, v in d.items())
        verdict = f"same (< {tol:g}{', float32' if pair == 'na' else ''})" if ok else 'different computation'
        print(f'| {pair} | {diffs} | {verdict} | {PEER_NOTES[pair]} |', flush=True)
    shapes = [(2, 16, 14, 14)] if args.quick else [(8, 256, 56, 56), (2, 512, 97, 97)]
    for shape in shapes:
        print(f'\n{list(shape)} (window, window_v2, bat, na~window at 98x98 in the larger shape: multiples of 7)')
        print('| pair | mode | ours min ms | peer min ms | ratio min | ours median ms | peer median ms | '
              'ratio median | ours peak MiB | peer peak MiB |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|')
        for pair in pairs:
            hw = PEER_LARGE_HW.get(pair, shape[2]) if shape[2] > 56 and not args.quick else shape[2]
            shp = (shape[0], shape[1], hw, hw)
            for mode in _peer_modes(pair):
                spec = dict(base, pair=pair, shape=list(shp), mode=mode)
                t = _run_forked(_guarded_peer_worker, spec, args.timeout, f'{pair} {list(shp)} {mode}')
                if t is None:
                    print(f'| {pair} | {mode} | - | - | - | - | - | - | - | - |', flush=True)
                    continue
                mem = {}
                for side in ('ours', 'peer'):
                    r = _run_forked(_guarded_peer_worker, dict(spec, side=side), args.timeout,
                                    f'{pair} {list(shp)} {mode} {side} memory')
                    mem[side] = _fmt(r, 'peak_mib')
                lo = {k: min(v) for k, v in t.items()}
                med = {k: statistics.median(v) for k, v in t.items()}
                tag = '' if same[pair] else ' (different computation)'
                name = pair if hw == shape[2] else f'{pair} @{hw}'
                print(f"| {name}{tag} | {mode} | {lo['ours']:.1f} | {lo['peer']:.1f} | {lo['ours'] / lo['peer']:.2f} | "
                      f"{med['ours']:.1f} | {med['peer']:.1f} | {med['ours'] / med['peer']:.2f} | {mem['ours']} | "
                      f"{mem['peer']} |", flush=True)


def _fmt(case: dict | None, key: str) -> str:
    return '-' if case is None else f'{case[key]:.1f}'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='tiny shapes and few repeats: a smoke run')
    parser.add_argument('--names', nargs='+', default=NAMES, help='registry names of the blocks')
    parser.add_argument('--repeats', type=int, default=None)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: all cores)')
    parser.add_argument('--growth', type=int, nargs=4, metavar=('B', 'C', 'H', 'W'),
                        help='smaller shape of the growth comparison (default 1 64 48 48; --quick 1 16 8 8)')
    parser.add_argument('--skip-shapes', action='store_true', help='only the growth comparison')
    parser.add_argument('--timeout', type=float, default=1800, help='seconds allowed to one case')
    parser.add_argument('--peers', action='store_true',
                        help='only the side-by-side section: ours vs timm / natten, same process, alternating')
    parser.add_argument('--peer-names', nargs='+', default=PEERS, help='pairs of the --peers section')
    args = parser.parse_args()

    import visattn

    args.threads = args.threads or torch.get_num_threads()
    args.repeats = args.repeats or (2 if args.quick else 5)
    shapes = [(2, 32, 13, 13), (2, 16, 14, 14)] if args.quick else [(2, 512, 97, 97), (8, 256, 56, 56)]
    growth = tuple(args.growth) if args.growth else (1, 16, 8, 8) if args.quick else (1, 64, 48, 48)
    known = set(visattn.list_attn())
    names = [n for n in args.names if n in known]
    for n in args.names:
        if n not in known:
            print(f'note: {n!r} is not registered (yet); skipped')
    print(f'torch {torch.__version__}, {args.threads} threads, CPU fp32, median of {args.repeats} after '
          f'{args.warmup} warm-up; peak = ru_maxrss high-water minus RSS before the first call, fresh process per case')
    print(f'block arguments beside the defaults (BLOCK_ARGS): {BLOCK_ARGS}')
    if args.peers:
        run_peers(args)
        return

    for shape in [] if args.skip_shapes else shapes:
        print(f'\n{list(shape)}')
        print('| block | fwd ms | fwd+bwd ms | fwd peak MiB | fwd+bwd peak MiB |\n|---|---:|---:|---:|---:|')
        for name in names:
            fwd, both = run_case(name, shape, 'fwd', args), run_case(name, shape, 'fwdbwd', args)
            print(f"| {name} | {_fmt(fwd, 'ms')} | {_fmt(both, 'ms')} | {_fmt(fwd, 'peak_mib')} | "
                  f"{_fmt(both, 'peak_mib')} |", flush=True)

    big = (*growth[:2], 2 * growth[2], 2 * growth[3])
    print(f'\ngrowth from {list(growth)} to {list(big)} (H and W doubled), forward + backward')
    print('| block | time ratio | expected | memory ratio | expected |\n|---|---:|---:|---:|---:|')
    for name in names:
        small, large = run_case(name, growth, 'fwdbwd', args), run_case(name, big, 'fwdbwd', args)
        if small is None or large is None:
            continue
        mem = f"{large['peak_mib'] / small['peak_mib']:.1f}x" if small['peak_mib'] >= 1 else 'n/a (< 1 MiB)'
        t_exp, m_exp = (f'{e}x' for e in EXPECTED_GROWTH[name]) if name in EXPECTED_GROWTH else ('?', '?')
        print(f"| {name} | {large['ms'] / small['ms']:.1f}x | {t_exp} | {mem} | {m_exp} |", flush=True)


if __name__ == '__main__':
    main()
