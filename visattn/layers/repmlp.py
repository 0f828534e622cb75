"""RepMLP block: fully connected layers over image partitions, with conv branches merged into the FC for inference.

Paper: "RepMLP: Re-parameterizing Convolutions into Fully-connected Layers for Image Recognition", Ding, Xia, Zhang,
Chu, Han, Ding, arXiv:2105.01883, 2021 (https://arxiv.org/abs/2105.01883; its later version is RepMLPNet,
arXiv:2112.11081, which keeps this block's re-parameterisation).

For an input ``x`` [B, C, H, W] cut into non-overlapping h×w partitions (an nh × nw grid), the block
computes, per partition ``p`` [C, h, w]:

- Global perceptron: ``v = FC₂(ReLU(FC₁(flat(BN(AvgPool_{h×w}(x))))))`` [C, nh, nw], one value per channel and
  partition, added to every pixel of its partition: ``p ← p + v``.
- Partition perceptron: ``y = BN₁ᵈ(FC₃(flat(p)))``, FC₃ a grouped FC (C·h·w)/g -> (O·h·w)/g per group (a grouped
  1×1 conv over the flattened partition), BN₁ᵈ per output unit.
- Local perceptron: ``y ← y + Σ_k BN_k(conv_k(p))``, grouped k×k convs with zero padding at the partition border
  (k in ``conv_kernels``, the released RepMLP-ResNets' (1, 3, 5)).

Output: the partitions put back in place, [B, O, H, W]. Re-parameterisation ("locality injection"):
a conv over an h×w partition is a linear map of the flattened partition, whose FC kernel is the conv applied to
the identity basis (``FC(M) = conv(I, K)``); with each batch norm folded (``a ⊙ y + d``), the local perceptron and
BN₁ᵈ merge into FC₃ (weight and bias), and the global perceptron's batch norm into FC₁. The deployed block
holds the global perceptron (pooling, FC₁, ReLU, FC₂) and FC₃ with bias.

Any H×W works: the input is zero-padded at the bottom and right to whole partitions and the output cropped back (the
released code asserts that H, W divide by h, w); the padding zeros enter the partition means and, in training mode,
the batch statistics, and the deploy form computes the training form (eval mode) at every size. The global
perceptron's FC₁ takes one value per channel and partition, so it is built for one grid, that of ``feat_size``: an
input whose padded grid differs is refused with a ValueError naming the sizes; with a single partition
(``feat_size`` <= ``partition_size``) there is no global perceptron (as the released code) and any size works.
Children keep the released names (``fc1_fc2.fc1``, ``fc1_fc2.fc2``, ``avg.bn``, ``fc3``, ``fc3_bn``); its
``repconv{k}`` branches are ``local.conv{k}`` here (`convert_official_repmlp` renames them).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_channels, check_feat_size, check_int, check_nchw, check_odd, is_fx_proxy
from ..registry import register
from ._reparam import ConvBn, bn_scale_shift, fuse_bn, pad_kernel, rename_keys

__all__ = ['RepMLPBlock', 'conv_to_fc', 'convert_official_repmlp']


def conv_to_fc(kernel: Tensor, bias: Tensor, height: int, width: int, groups: int) -> tuple[Tensor, Tensor]:
    """The grouped FC over flattened ``height × width`` maps equal to a grouped conv with zero padding k//2.

    Args:
        kernel: conv kernel [O, C/groups, k, k]; bias: [O].

    Returns:
        the FC as a grouped 1×1 conv weight [O·h·w, C·h·w/groups, 1, 1] and its bias [O·h·w] (units ordered
        (channel, row, column), as ``flatten`` orders a [C, h, w] map).
    """
    o, cg, k, _ = kernel.shape
    n = cg * height * width
    basis = torch.eye(n, device=kernel.device, dtype=kernel.dtype).view(n, cg, height, width).repeat(1, groups, 1, 1)
    response = F.conv2d(basis, kernel, padding=k // 2, groups=groups)  # [n, O, h, w]: the response to basis input i
    weight = response.reshape(n, groups, -1).permute(1, 2, 0).reshape(o * height * width, n, 1, 1)
    return weight, bias.repeat_interleave(height * width)


@register(
    'repmlp', paper='RepMLP: Re-parameterizing Convolutions into Fully-connected Layers for Image Recognition',
    arxiv='2105.01883', year=2021, family='reparam', complexity='O(N·C²·h·w / g)',
)
class RepMLPBlock(nn.Module):
    """RepMLP: global, partition and local perceptrons; the local one merges into the partition FC once deployed.

    Args:
        channels: input channels C.
        out_channels: output channels O (default C).
        feat_size: (H, W) (or one int) of the maps the global perceptron is built for (default 14: RepMLP-Res50's
            third stage at 224²).
        partition_size: partition (h, w) (or one int, default 7, as the released RepMLP-ResNets).
        conv_kernels: odd kernel sizes of the local perceptron's conv branches (default (1, 3, 5); () for none).
        reduction: the global perceptron's hidden width is C·nh·nw / reduction (default 1, as released).
        groups: groups of FC₃ and of the conv branches (default 1; the released ResNets use 4 or 8).
        deploy: build the deploy form (no local perceptron, no batch norms, FC₃ with bias) directly.
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, O, H, W].
    """

    def __init__(
            self,
            channels: int,
            *,
            out_channels: int | None = None,
            feat_size: int | tuple[int, int] = 14,
            partition_size: int | tuple[int, int] = 7,
            conv_kernels: tuple[int, ...] = (1, 3, 5),
            reduction: int = 1,
            groups: int = 1,
            deploy: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = c = check_channels(channels)
        self.out_channels = o = channels if out_channels is None else check_channels(out_channels, 'out_channels')
        self.feat_size = check_feat_size('feat_size', feat_size)
        self.partition_size = h, w = check_feat_size('partition_size', partition_size)
        if not isinstance(conv_kernels, (tuple, list)):
            raise TypeError(f'conv_kernels must be a tuple of odd ints, got {type(conv_kernels).__name__}')
        self.conv_kernels = tuple(check_odd('conv_kernels', k) for k in conv_kernels)
        if len(set(self.conv_kernels)) != len(self.conv_kernels):
            raise ValueError(f'conv_kernels must not repeat a size, got {tuple(conv_kernels)}')
        check_int('reduction', reduction)
        self.groups = check_int('groups', groups)
        if c % groups or o % groups:
            raise ValueError(f'groups must divide channels and out_channels, got groups={groups} for {c} -> {o}')
        if not isinstance(deploy, bool):
            raise TypeError(f'deploy must be a bool, got {type(deploy).__name__} {deploy!r}')
        self.grid = (-(-self.feat_size[0] // h), -(-self.feat_size[1] // w))
        self.global_perceptron = self.grid != (1, 1)
        self.deployed = deploy

        self.avg: nn.Sequential | None = None
        self.fc1_fc2: nn.Sequential | None = None
        if self.global_perceptron:
            units = c * self.grid[0] * self.grid[1]
            hidden = units // reduction
            if hidden < 1:
                raise ValueError(f'reduction leaves no hidden unit of the global perceptron ({units} inputs), '
                                 f'got {reduction}')
            self.avg = nn.Sequential()
            self.avg.add_module('avg', nn.AvgPool2d((h, w)))
            if not deploy:
                self.avg.add_module('bn', nn.BatchNorm2d(c, **dd))
            self.fc1_fc2 = nn.Sequential()
            self.fc1_fc2.add_module('fc1', nn.Linear(units, hidden, **dd))
            self.fc1_fc2.add_module('relu', nn.ReLU())
            self.fc1_fc2.add_module('fc2', nn.Linear(hidden, units, **dd))
        self.fc3 = nn.Conv2d(c * h * w, o * h * w, 1, groups=groups, bias=deploy, **dd)
        self.fc3_bn: nn.BatchNorm1d | None = None
        self.local: nn.ModuleDict | None = None
        if not deploy:
            nn.init.orthogonal_(self.fc3.weight)  # the released code's initialisation
            self.fc3_bn = nn.BatchNorm1d(o * h * w, **dd)
            if self.conv_kernels:
                self.local = nn.ModuleDict({
                    f'conv{k}': ConvBn(c, o, k, padding=k // 2, groups=groups, **dd) for k in self.conv_kernels})

    def _check_grid(self, nh: int, nw: int, x: Tensor) -> None:
        if self.global_perceptron and (nh != self.grid[0] or nw != self.grid[1]):
            raise ValueError(
                f'RepMLPBlock: its global perceptron is built for a {self.grid[0]}×{self.grid[1]} grid of '
                f'{self.partition_size[0]}×{self.partition_size[1]} partitions (feat_size={self.feat_size}); an input '
                f'of h×w = {x.shape[2]}×{x.shape[3]} makes a {nh}×{nw} grid')

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'RepMLPBlock')
        B, C, H, W = x.shape
        h, w = self.partition_size
        nh, nw = (H + h - 1) // h, (W + w - 1) // w
        if not is_fx_proxy(x):
            self._check_grid(nh, nw, x)
        hp, wp = nh * h, nw * w
        if hp != H or wp != W:
            x = F.pad(x, [0, wp - W, 0, hp - H])
        parts = x.view(B, C, nh, h, nw, w)
        if self.avg is not None and self.fc1_fc2 is not None:
            v = self.fc1_fc2(self.avg(x).reshape(B, C * nh * nw))
            parts = parts + v.view(B, C, nh, 1, nw, 1)
        m, o = B * nh * nw, self.out_channels
        parts = parts.permute(0, 2, 4, 1, 3, 5).reshape(m, C, h, w)  # one row per partition
        y = self.fc3(parts.reshape(m, C * h * w, 1, 1)).reshape(m, o * h * w)
        if self.fc3_bn is not None:
            y = self.fc3_bn(y)
        if self.local is not None:
            z = torch.zeros_like(y)
            for branch in self.local.values():
                z = z + branch(parts).reshape(m, o * h * w)
            y = y + z
        y = y.view(B, nh, nw, o, h, w).permute(0, 3, 1, 4, 2, 5).reshape(B, o, hp, wp)
        return y[:, :, :H, :W]

    def equivalent_fc(self) -> tuple[Tensor, Tensor]:
        """FC₃'s weight [O·h·w, C·h·w/g, 1, 1] and bias [O·h·w] with BN₁ᵈ and the local perceptron merged in (eval
        mode; differentiable in the parameters)."""
        weight, bias = fuse_bn(self.fc3.weight, self.fc3_bn)
        if self.local is not None:
            k_max = max(self.conv_kernels)
            kernel = bias_c = None
            for branch in self.local.values():
                k, b = branch.fused()
                k = pad_kernel(k, k_max)
                kernel, bias_c = (k, b) if kernel is None else (kernel + k, bias_c + b)
            fc_w, fc_b = conv_to_fc(kernel, bias_c, *self.partition_size, self.groups)
            weight, bias = weight + fc_w, bias + fc_b
        return weight, bias

    def equivalent_fc1(self) -> tuple[Tensor, Tensor]:
        """FC₁'s weight and bias with the global perceptron's batch norm (before it) folded in."""
        scale, shift = bn_scale_shift(self.avg.bn)
        fc1 = self.fc1_fc2.fc1
        reps = fc1.in_features // self.channels  # FC₁'s inputs are ordered (channel, partition row, column)
        ct = torch.promote_types(fc1.weight.dtype, scale.dtype)
        weight = fc1.weight.to(ct)
        return weight * scale.repeat_interleave(reps), fc1.bias.to(ct) + weight @ shift.repeat_interleave(reps)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Merge the local perceptron and the batch norms into FC₃ and FC₁, in place (a no-op once deployed)."""
        if self.deployed:
            return
        weight, bias = self.equivalent_fc()
        fc3 = nn.Conv2d(self.fc3.in_channels, self.fc3.out_channels, 1, groups=self.groups, bias=True,
                        device=self.fc3.weight.device, dtype=self.fc3.weight.dtype)
        fc3.weight.copy_(weight)
        fc3.bias.copy_(bias)
        if self.global_perceptron:
            w1, b1 = self.equivalent_fc1()
            self.fc1_fc2.fc1.weight.copy_(w1)
            self.fc1_fc2.fc1.bias.copy_(b1)
            del self.avg.bn
        self.fc3, self.fc3_bn, self.local = fc3, None, None
        self.deployed = True

    def extra_repr(self) -> str:
        return (f'feat_size={self.feat_size}, partition_size={self.partition_size}, conv_kernels={self.conv_kernels}, '
                f'groups={self.groups}, deployed={self.deployed}')


def convert_official_repmlp(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename the released RepMLP block's local-perceptron keys (``repconv{k}.``) to this block's (``local.conv{k}.``);
    other keys are kept."""
    names = {f'repconv{k}.': f'local.conv{k}.' for k in range(1, 32, 2)}
    return rename_keys(state_dict, names)
