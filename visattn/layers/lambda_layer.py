"""Lambda layer: content and position interactions summarised into linear functions (lambdas) applied to queries.

Paper: "LambdaNetworks: Modeling Long-Range Interactions Without Attention", Irwan Bello, ICLR 2021,
arXiv:2102.08602 (https://arxiv.org/abs/2102.08602).

For an input ``x`` [C, H, W] and its N = H·W positions n (the context is the input itself), with 1×1 projections
``Q = BN(W_Q x)`` [N, h, k] (``h`` query heads of depth ``k``), ``K = W_K x`` [N, k] and ``V = BN(W_V x)`` [N, v],
v = d_out / h (the paper's multi-query formulation, intra-depth u = 1), batch norm on queries and values as the
paper:

    K̄ = softmax_n(K)                                  (normalised over the positions, per key channel)
    λ^c = K̄^T V                                        [k, v]   the content lambda, shared by every query
    λ^p_n = Σ_m E_{nm}^T V_m                            [k, v]   the position lambda of position n
    y_n^h = (λ^c + λ^p_n)^T q_n^h                       [v]      for each head h; y_n = concat_h y_n^h

Position lambdas (``r``):

- ``r`` odd (default 23): the paper's lambda convolution. ``E_{nm} = E[m - n]`` for ``m`` in the r×r window around
  ``n`` and 0 elsewhere, i.e. ``λ^p = conv(V, E)`` with a [k, r, r] kernel over the (height, width) of each value
  channel (the paper's 3-D convolution of size r×r×1 over height, width and value depth), zero-padded at the borders:
  an output depends on the input outside its r×r window only through the global content lambda.
- ``r=None``: global relative position embeddings ``E_{nm} = E[Δh, Δw]`` (Δ = key - query offset) from a table
  [2·Hf - 1, 2·Wf - 1, k] sized for ``feat_size`` = (Hf, Wf) (timm ties it to that size). Any H×W works: offsets
  farther than the table holds share its outermost embeddings (the relative positions are clipped, as Shaw et al.'s);
  at H ≤ Hf and W ≤ Wf nothing is clipped, and at ``feat_size`` it is timm's layer exactly.

Defaults (the paper's ImageNet LambdaResNet-50 of its Table 3, 15.0M parameters): ``dim_head`` k = 16, ``num_heads``
h = 4, u = 1, lambda convolution with a 23×23 scope (r = 23; timm's default is 9). ``stride=2`` downsamples after the
layer by a 3×3 average pooling with stride 2 (the paper: "3x3 average-pooling with stride 2 after the lambda
layers ... in place of the strided convolution"; TensorFlow's SAME pooling, padding not counted); ``pool_size=2`` is
timm's 2×2 average pooling (timm floors odd sizes, ours keeps ceil(H / 2) so that it matches a strided shortcut).
The paper's lambda convolution has no bias; timm's ``Conv3d`` has one: ``lambda_bias=True`` adds it (a constant added
to every position lambda). Initialisation as timm's: fan-in normal projections, embeddings N(0, 1/k) (lambda
convolution) or N(0, 0.02²) (relative table).

``LambdaLayer.from_timm`` builds the layer equal to a ``timm.layers.LambdaLayer`` (``lambda_bias=True``,
``pool_size=2``); with those options our state dict has timm's keys (``qkv``, ``norm_q``, ``norm_v``,
``conv_lambda`` or ``pos_emb``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_channels, check_float, check_int, check_nchw, check_odd, make_divisible, softmax_fp32
from ..registry import register

__all__ = ['LambdaLayer']


def _pair(size: int | tuple[int, int], name: str) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise TypeError(f'{name} must be an int or a pair of ints, got {size!r}')
    return check_int(name, size[0]), check_int(name, size[1])


def clipped_offsets(size: int, reach: int, device: torch.device) -> Tensor:
    """Rows of a relative table for every (query, key) pair of an axis of ``size``: ``clamp(key - query, -reach,
    reach) + reach``, [size, size] (int64)."""
    pos = torch.arange(size, device=device)
    return (pos[None, :] - pos[:, None]).clamp(-reach, reach) + reach


@register(
    'lambda', paper='LambdaNetworks: Modeling Long-Range Interactions Without Attention', arxiv='2102.08602',
    year=2021, family='local', complexity='O(N·r²·k·v)',
)
class LambdaLayer(nn.Module):
    """Multi-query lambda layer with a content lambda and local (lambda convolution) or global position lambdas.

    Args:
        channels: input channels C.
        out_channels: output channels d_out (default C); divisible by ``num_heads``.
        feat_size: (Hf, Wf) the global relative table is sized for (needed with ``r=None``; ignored otherwise).
        stride: 1, or 2 for an average pooling after the layer (see ``pool_size``).
        num_heads: query heads h (default 4).
        dim_head: query/key depth k (default 16); None: ``d_out * qk_ratio`` rounded to 8, over the heads.
        r: scope of the lambda convolution (odd, default 23), or None for global relative position lambdas.
        qk_ratio: query/key width relative to ``d_out`` when ``dim_head`` is None (default 1).
        qkv_bias: bias in the projection (default False).
        pool_size: 3 (default, the paper's 3×3 average pooling, stride 2, padding 1) or 2 (timm's 2×2).
        lambda_bias: a bias in the lambda convolution (default False, the paper's; True as timm's ``Conv3d``).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, d_out, ceil(H / stride), ceil(W / stride)].
    """

    def __init__(
            self,
            channels: int,
            out_channels: int | None = None,
            *,
            feat_size: int | tuple[int, int] | None = None,
            stride: int = 1,
            num_heads: int = 4,
            dim_head: int | None = 16,
            r: int | None = 23,
            qk_ratio: float = 1.0,
            qkv_bias: bool = False,
            pool_size: int = 3,
            lambda_bias: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.out_channels = check_channels(out_channels or channels, 'out_channels')
        self.num_heads = check_int('num_heads', num_heads)
        self.stride = check_int('stride', stride, 1, 2)
        self.pool_size = check_int('pool_size', pool_size, 2, 3)
        qk_ratio = check_float('qk_ratio', qk_ratio, 0., None, low_open=True)
        if dim_head is not None:
            check_int('dim_head', dim_head)
        if r is not None:
            check_odd('r', r)
        if self.out_channels % num_heads:
            raise ValueError(f'out_channels={self.out_channels} must be divisible by num_heads={num_heads}')
        self.dim_qk = dim_head or make_divisible(self.out_channels * qk_ratio, 8) // num_heads
        self.dim_v = self.out_channels // num_heads
        self.r = r
        self.qkv = nn.Conv2d(channels, num_heads * self.dim_qk + self.dim_qk + self.dim_v, 1, bias=qkv_bias, **dd)
        self.norm_q = nn.BatchNorm2d(num_heads * self.dim_qk, **dd)
        self.norm_v = nn.BatchNorm2d(self.dim_v, **dd)
        if r is not None:
            # timm's layout: a Conv3d(1, k, (r, r, 1)) over [H, W, v]; run as a 2-D convolution of each value channel
            self.conv_lambda = nn.Conv3d(1, self.dim_qk, (r, r, 1), padding=(r // 2, r // 2, 0), bias=lambda_bias, **dd)
            self.pos_emb = None
            self.feat_size = None
        else:
            if feat_size is None:
                raise ValueError('feat_size (the size the relative table is sized for) is needed with r=None')
            self.feat_size = _pair(feat_size, 'feat_size')
            self.conv_lambda = None
            self.pos_emb = nn.Parameter(torch.empty(2 * self.feat_size[0] - 1, 2 * self.feat_size[1] - 1,
                                                    self.dim_qk, **dd))
        if stride == 1:
            self.pool = nn.Identity()
        elif pool_size == 3:
            self.pool = nn.AvgPool2d(3, 2, padding=1, count_include_pad=False)
        else:
            self.pool = nn.AvgPool2d(2, 2, ceil_mode=True)
        self.reset_parameters()

    @classmethod
    def from_timm(cls, module: nn.Module) -> LambdaLayer:
        """The layer equal to a ``timm.layers.LambdaLayer`` (its weights copied, on its device and dtype); unlike
        timm's, its ``r=None`` form runs at any H×W."""
        w = module.qkv.weight
        r = None if module.conv_lambda is None else module.conv_lambda.kernel_size[0]
        m = cls(w.shape[1], module.num_heads * module.dim_v, feat_size=module.feat_size,
                stride=2 if isinstance(module.pool, nn.AvgPool2d) else 1, num_heads=module.num_heads,
                dim_head=module.dim_qk, r=r, qkv_bias=module.qkv.bias is not None, pool_size=2,
                lambda_bias=r is not None and module.conv_lambda.bias is not None, device=w.device, dtype=w.dtype)
        m.load_state_dict(module.state_dict())
        return m

    def reset_parameters(self) -> None:
        """Fan-in normal projection; lambda convolution N(0, 1/k), relative table N(0, 0.02²) (timm's)."""
        nn.init.normal_(self.qkv.weight, std=self.channels ** -0.5)
        if self.qkv.bias is not None:
            nn.init.zeros_(self.qkv.bias)
        for norm in (self.norm_q, self.norm_v):
            norm.reset_parameters()
        if self.conv_lambda is not None:
            nn.init.normal_(self.conv_lambda.weight, std=self.dim_qk ** -0.5)
            if self.conv_lambda.bias is not None:
                nn.init.zeros_(self.conv_lambda.bias)
        if self.pos_emb is not None:
            nn.init.normal_(self.pos_emb, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'LambdaLayer')
        B, _, H, W = x.shape
        N, h, k, v = H * W, self.num_heads, self.dim_qk, self.dim_v
        q, key, val = self.qkv(x).split([h * k, k, v], dim=1)
        # channels-last inputs to the norms: their outputs are then read pixel-major as plain views, and eval-mode
        # BatchNorm2d gets input and gradient in one memory format (with a contiguous input and a channels-last
        # gradient, PyTorch 2.14's eval-mode batch-norm backward returns a wrong input gradient)
        cl = torch.channels_last
        q = self.norm_q(q.contiguous(memory_format=cl)).permute(0, 2, 3, 1).reshape(B, N, h, k)
        val = self.norm_v(val.contiguous(memory_format=cl)).permute(0, 2, 3, 1)  # [B, H, W, v]
        key = softmax_fp32(key.reshape(B, k, N), dim=-1).to(val.dtype)  # K̄: normalised over the positions
        content = key @ val.reshape(B, N, v)  # λ^c [B, k, v]
        if self.conv_lambda is not None:
            # λ^p_n = Σ_offsets E[offset] V_{n + offset}: a 3-D convolution over [H, W, v] -> [B, N, k, v]
            lam = self.conv_lambda(val.unsqueeze(1)).reshape(B, k, N, v).transpose(1, 2)
        else:
            pos_emb = self.pos_emb
            assert pos_emb is not None  # TorchScript: the table exists when the convolution does not
            rh = clipped_offsets(H, pos_emb.shape[0] // 2, x.device)
            rw = clipped_offsets(W, pos_emb.shape[1] // 2, x.device)
            # E_{nm} [N, N, k], rows (Δh, Δw) of the key - query offsets
            emb = pos_emb[rh[:, None, :, None], rw[None, :, None, :]].reshape(N, N, k)
            lam = emb.to(val.dtype).permute(0, 2, 1) @ val.reshape(B, 1, N, v)  # [B, N, k, v]
        out = q @ (lam + content[:, None])  # y_n = (λ^c + λ^p_n)^T q_n: [B, N, h, v]
        return self.pool(out.permute(0, 2, 3, 1).reshape(B, h * v, H, W))
