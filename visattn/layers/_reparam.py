"""Structural re-parameterisation, written once: the kernel algebra that turns a sum of conv-BN branches into one
conv, the base class of the blocks that train as branches and deploy as one k×k conv, and `reparameterize`, which
converts every such block of a model.

The transformations (numbered as in the DBB paper, arXiv:2103.13425, Sect. 3.2), each exact in eval mode, where a
batch norm is the per-channel affine map ``BN(y) = a ⊙ y + d`` with ``a = γ / sqrt(σ² + ε)`` and ``d = β - μ a``:

- I, conv-BN: ``BN(W ∗ x) = (a W) ∗ x + d`` (`fuse_bn`).
- II, branch addition: ``W₁ ∗ x + W₂ ∗ x = (W₁ + W₂) ∗ x`` (kernels of one size, after `pad_kernel`).
- III, 1×1 then k×k: ``W₂ ∗ (W₁ ∗ x + b₁) + b₂ = (W₂ W₁) ∗ x + (b₂ + Σ W₂ b₁)`` when the k×k conv sees ``b₁`` (not 0)
  outside the map (`merge_1x1_kxk`; DBB's padded batch norm makes it so).
- V, average pooling: a k×k conv whose kernel is ``1/k²`` on each channel's own input (`avg_kernel`).
- VI, multi-scale: a 1×1, 1×k or k×1 kernel is the k×k kernel that is zero off its centre row / column
  (`pad_kernel`); the identity is the 1×1 identity kernel (`identity_kernel`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_channels, check_int, check_nchw, check_odd, get_act

__all__ = [
    'ConvBn', 'ReparamConvBlock', 'avg_kernel', 'bn_scale_shift', 'fuse_bn', 'identity_kernel', 'merge_1x1_kxk',
    'pad_kernel', 'rename_keys', 'reparameterize',
]


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """The eval-mode batch norm as ``a ⊙ y + d``: (a, d), each [C], in at least float32.

    Raises:
        ValueError: the batch norm keeps no running statistics (``track_running_stats=False``), so it has no eval
            form to fold.
    """
    mean, var = bn.running_mean, bn.running_var
    if mean is None or var is None:
        raise ValueError(f'{type(bn).__name__}({bn.num_features}) keeps no running statistics '
                         '(track_running_stats=False): it cannot be folded into a conv')
    ct = _compute_dtype(var)
    scale = torch.rsqrt(var.to(ct) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(ct)
    shift = -mean.to(ct) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(ct)
    return scale, shift


def fuse_bn(kernel: Tensor, bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """Transformation I: the kernel and bias of ``bn(conv(x))`` for a bias-free conv (or FC) ``kernel`` [O, ...].

    Returns ``(a ⊙ kernel, d)`` in at least float32 (float64 stays float64).
    """
    scale, shift = bn_scale_shift(bn)
    ct = torch.promote_types(kernel.dtype, scale.dtype)
    return kernel.to(ct) * scale.to(ct).view([-1] + [1] * (kernel.dim() - 1)), shift.to(ct)


def identity_kernel(channels: int, groups: int, kernel_size: int, *, device=None, dtype=None) -> Tensor:
    """The identity as a grouped k×k conv kernel [C, C/groups, k, k]: 1 at the centre tap of each channel's own
    input, 0 elsewhere."""
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, kernel_size, kernel_size, device=device, dtype=dtype)
    idx = torch.arange(channels, device=device)
    kernel[idx, idx % per_group, kernel_size // 2, kernel_size // 2] = 1.
    return kernel


def avg_kernel(channels: int, groups: int, kernel_size: int, *, device=None, dtype=None) -> Tensor:
    """Transformation V: k×k average pooling (zero padding counted) as a grouped conv kernel [C, C/groups, k, k]:
    ``1/k²`` on every tap of each channel's own input."""
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, kernel_size, kernel_size, device=device, dtype=dtype)
    idx = torch.arange(channels, device=device)
    kernel[idx, idx % per_group] = 1. / kernel_size ** 2
    return kernel


def pad_kernel(kernel: Tensor, kernel_size: int) -> Tensor:
    """Transformation VI: a centred ``h × w`` kernel [O, I, h, w] (odd h, w <= k) as the k×k kernel that is zero
    off its centre rows and columns."""
    h, w = kernel.shape[-2:]
    ph, pw = (kernel_size - h) // 2, (kernel_size - w) // 2
    return F.pad(kernel, [pw, pw, ph, ph])


def merge_1x1_kxk(k1: Tensor, b1: Tensor, k2: Tensor, b2: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """Transformation III: a grouped 1×1 conv (``k1`` [M, C/g, 1, 1], bias ``b1`` [M]) followed by a grouped k×k conv
    (``k2`` [O, M/g, k, k], bias ``b2`` [O]) as one k×k conv [O, C/g, k, k] with its bias [O].

    Exact when the k×k conv sees the 1×1 conv's value at a zero input, ``b1``, outside the map (DBB pads so).
    """
    m, cin = k1.shape[:2]
    o, mg, kh, kw = k2.shape
    kernel = torch.einsum(
        'gomyx,gmc->gocyx', k2.reshape(groups, o // groups, mg, kh, kw), k1.reshape(groups, m // groups, cin))
    bias = torch.einsum('gom,gm->go', k2.sum((2, 3)).reshape(groups, o // groups, mg), b1.reshape(groups, mg))
    return kernel.reshape(o, cin, kh, kw), b2 + bias.reshape(o)


def rename_keys(state_dict: dict[str, Tensor], names: dict[str, str]) -> dict[str, Tensor]:
    """A copy of ``state_dict`` whose keys have each child name ``old`` of ``names`` (e.g. ``'rbr_dense.'``, at the
    start or after a dot) replaced by ``names[old]``: released checkpoints to visattn's names."""
    out = {}
    for key, value in state_dict.items():
        for old, new in names.items():
            if key.startswith(old) or f'.{old}' in key:
                head, tail = key.rsplit(old, 1)
                key = head + new + tail
                break
        out[key] = value
    return out


class ConvBn(nn.Sequential):
    """A bias-free conv and its batch norm, as children ``conv`` and ``bn`` (the layout, and state-dict keys, of
    timm's ``ConvNormAct`` and of the re-parameterisation papers' released ``conv_bn``)."""

    def __init__(
            self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], *, stride: int = 1,
            padding: int | tuple[int, int] = 0, dilation: int = 1, groups: int = 1, device=None, dtype=None,
    ) -> None:
        super().__init__()
        self.add_module('conv', nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                          bias=False, device=device, dtype=dtype))
        self.add_module('bn', nn.BatchNorm2d(out_channels, device=device, dtype=dtype))

    def fused(self) -> tuple[Tensor, Tensor]:
        """Kernel and bias of the conv with the batch norm folded in."""
        return fuse_bn(self.conv.weight, self.bn)


class ReparamConvBlock(nn.Module):
    """Base of the blocks that train as a sum of conv-BN branches and deploy as one k×k conv ``reparam_conv``.

    A subclass builds its branches (children named in ``branch_names``) unless ``deploy``, and defines
    `forward_branches` (the training form) and `equivalent_kernel_bias` (its fusion). `reparameterize` computes the
    fused kernel, replaces the branches by ``reparam_conv`` in place and sets ``deployed``; ``deploy=True`` builds
    the deploy form directly, so a deployed model's state dict loads into it.

    Shapes:
        x: [B, C, H, W] -> [B, out_channels, ⌈H / stride⌉, ⌈W / stride⌉].
    """

    branch_names: ClassVar[tuple[str, ...]] = ()

    def __init__(
            self,
            channels: int,
            out_channels: int | None,
            kernel_size: int,
            stride: int,
            dilation: int,
            groups: int,
            act_layer: type[nn.Module] | str | None,
            deploy: bool,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        self.in_channels = check_channels(channels)
        self.out_channels = channels if out_channels is None else check_channels(out_channels, 'out_channels')
        self.kernel_size = check_odd('kernel_size', kernel_size)
        self.stride = check_int('stride', stride)
        self.dilation = check_int('dilation', dilation)
        self.groups = check_int('groups', groups)
        if self.in_channels % groups or self.out_channels % groups:
            raise ValueError(f'groups must divide channels and out_channels, got groups={groups} for '
                             f'{self.in_channels} -> {self.out_channels} channels')
        if not isinstance(deploy, bool):
            raise TypeError(f'deploy must be a bool, got {type(deploy).__name__} {deploy!r}')
        self.padding = dilation * (kernel_size // 2)
        self.block_name = type(self).__name__
        self.deployed = deploy
        self.reparam_conv = self._deploy_conv(device=device, dtype=dtype) if deploy else None
        self.act = get_act(act_layer, inplace=True)

    def _deploy_conv(self, device=None, dtype=None) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, bias=True, device=device, dtype=dtype)

    def forward_branches(self, x: Tensor) -> Tensor:
        """The training form: the sum of the branches, before the activation."""
        raise NotImplementedError

    def equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """Kernel [O, C/groups, k, k] and bias [O] of the one conv that equals `forward_branches` in eval mode
        (differentiable in the branch parameters)."""
        raise NotImplementedError

    def init_gamma(self, value: float) -> None:
        """Set the weight of the last batch norm of every branch to ``value`` (0: the block starts at zero, as timm's
        ``zero_init_last``); a deployed block has none."""
        if self.reparam_conv is not None:
            return
        for bn in self.branch_output_norms():
            nn.init.constant_(bn.weight, value)

    def branch_output_norms(self) -> list[nn.BatchNorm2d]:
        """The batch norm that ends each branch."""
        raise NotImplementedError

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fuse the branches, in place, into the single deploy conv ``reparam_conv`` (a no-op once deployed)."""
        if self.reparam_conv is not None:
            return
        kernel, bias = self.equivalent_kernel_bias()
        ref = next(self.parameters())
        conv = self._deploy_conv(device=ref.device, dtype=ref.dtype)
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
        for name in self.branch_names:
            setattr(self, name, None)
        self.reparam_conv = conv
        self.deployed = True

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.in_channels, self.block_name)
        if self.reparam_conv is not None:
            y = self.reparam_conv(x)
        else:
            y = self.forward_branches(x)
        return self.act(y)

    def extra_repr(self) -> str:
        return f'deployed={self.deployed}'


def reparameterize(model: nn.Module) -> nn.Module:
    """Convert every re-parameterisable block of ``model`` to its deploy form, in place, and return ``model`` in
    eval mode.

    A module with a ``reparameterize()`` method (visattn's blocks, timm's ``RepVggBlock``, MobileOne and RepGhost
    blocks) or, failing that, ``switch_to_deploy()`` (the released code of ACNet, DBB and RepMLP) is converted
    and not descended into; every other module is searched. Deploy outputs equal the training form's in eval
    mode, so the model is put in eval mode first (batch norms fold their running statistics).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f'model must be a torch.nn.Module, got {type(model).__name__}')
    model.eval()

    def visit(module: nn.Module) -> None:
        for method in ('reparameterize', 'switch_to_deploy'):
            fn = getattr(module, method, None)
            if callable(fn):
                fn()
                return
        for child in module.children():
            visit(child)

    visit(model)
    return model.eval()
