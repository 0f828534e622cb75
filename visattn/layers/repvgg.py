"""RepVGG block: a 3×3 conv-BN, a 1×1 conv-BN and an identity BN summed for training, one 3×3 conv for inference.

Paper: "RepVGG: Making VGG-style ConvNets Great Again", Ding, Zhang, Ma, Han, Ding, Sun, CVPR 2021,
arXiv:2101.03697 (https://arxiv.org/abs/2101.03697).

Training form (the paper's RepVGG block), for an input ``x`` [B, C, H, W]:

``y = act(BN₃(W₃ ∗ x) + BN₁(W₁ ∗ x) + BN₀(x))``

with ``W₃`` a k×k conv (k = 3), ``W₁`` a 1×1 conv, both with the block's stride and groups, and the identity
branch ``BN₀`` only where C = C_out and the stride is 1. In eval mode each batch norm is the affine map
``a ⊙ y + d`` (``a = γ/√(σ² + ε)``, ``d = β − μ a``), so the three branches are one k×k conv with bias:

``W = a₃ W₃ + pad(a₁ W₁) + a₀ I``, ``b = d₃ + d₁ + d₀``

(``pad``: the 1×1 kernel at the centre of a k×k one; ``I``: the identity kernel). `reparameterize` replaces the
branches by that conv (``reparam_conv``) in place.

The ReLU after the sum belongs to the block, as in the paper's block diagram, the released code and timm's
``RepVggBlock`` (``act_layer=None`` leaves it out). The children are named as timm's ``RepVggBlock``
(``conv_kxk.conv``, ``conv_kxk.bn``, ``conv_1x1.conv``, ``conv_1x1.bn``, ``identity``, deployed ``reparam_conv``),
so timm's RepVGG weights load into this block without a key map, in both forms; `convert_official_repvgg` renames
the released code's keys (``rbr_dense``, ``rbr_1x1``, ``rbr_identity``, ``rbr_reparam``). Batch norms start at
γ = 1, β = 0 (PyTorch's default, as the released code; timm's ``RepVggBlock.init_weights`` draws γ ~ N(0.1, 0.1)).
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from ..registry import register
from ._reparam import ConvBn, ReparamConvBlock, fuse_bn, identity_kernel, pad_kernel, rename_keys

__all__ = ['RepVggBlock', 'convert_official_repvgg']


@register(
    'repvgg', paper='RepVGG: Making VGG-style ConvNets Great Again', arxiv='2101.03697', year=2021,
    family='reparam', complexity='O(N·C²·k²)',
)
class RepVggBlock(ReparamConvBlock):
    """RepVGG block: k×k conv-BN + 1×1 conv-BN + identity BN, then the activation; one k×k conv once deployed.

    Args:
        channels: input channels C.
        out_channels: output channels (default C); the identity branch exists only when it equals C and the stride
            is 1.
        kernel_size: the odd kernel size k of the main branch (default 3).
        stride: stride of the conv branches (default 1).
        dilation: dilation of the k×k branch (default 1).
        groups: groups of both conv branches (default 1).
        act_layer: activation after the sum (default ReLU; None: none).
        deploy: build the deploy form (one k×k conv with bias) directly.
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, out_channels, ⌈H / stride⌉, ⌈W / stride⌉].
    """

    branch_names = ('conv_kxk', 'conv_1x1', 'identity')

    def __init__(
            self,
            channels: int,
            *,
            out_channels: int | None = None,
            kernel_size: int = 3,
            stride: int = 1,
            dilation: int = 1,
            groups: int = 1,
            act_layer: type[nn.Module] | str | None = nn.ReLU,
            deploy: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(channels, out_channels, kernel_size, stride, dilation, groups, act_layer, deploy,
                         device=device, dtype=dtype)
        dd = dict(device=device, dtype=dtype)
        c, o = self.in_channels, self.out_channels
        self.conv_kxk: ConvBn | None = None
        self.conv_1x1: ConvBn | None = None
        self.identity: nn.BatchNorm2d | None = None
        if not deploy:
            self.conv_kxk = ConvBn(c, o, kernel_size, stride=stride, padding=self.padding, dilation=dilation,
                                   groups=groups, **dd)
            self.conv_1x1 = ConvBn(c, o, 1, stride=stride, groups=groups, **dd)
            if c == o and stride == 1:
                self.identity = nn.BatchNorm2d(o, **dd)

    def forward_branches(self, x: Tensor) -> Tensor:
        y = self.conv_kxk(x) + self.conv_1x1(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return y

    def equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        kernel, bias = self.conv_kxk.fused()
        k1, b1 = self.conv_1x1.fused()
        kernel, bias = kernel + pad_kernel(k1, self.kernel_size), bias + b1
        if self.identity is not None:
            eye = identity_kernel(self.out_channels, self.groups, self.kernel_size, device=kernel.device,
                                  dtype=kernel.dtype)
            k0, b0 = fuse_bn(eye, self.identity)
            kernel, bias = kernel + k0, bias + b0
        return kernel, bias

    def branch_output_norms(self) -> list[nn.BatchNorm2d]:
        norms = [self.conv_kxk.bn, self.conv_1x1.bn]
        return norms + ([self.identity] if self.identity is not None else [])


_OFFICIAL_NAMES = {'rbr_dense.': 'conv_kxk.', 'rbr_1x1.': 'conv_1x1.', 'rbr_identity.': 'identity.',
                   'rbr_reparam.': 'reparam_conv.'}


def convert_official_repvgg(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename the keys of a state dict in the released RepVGG code's layout (DingXiaoH/RepVGG: ``rbr_dense``,
    ``rbr_1x1``, ``rbr_identity``, ``rbr_reparam``) to this block's (timm's) names; other keys are kept."""
    return rename_keys(state_dict, _OFFICIAL_NAMES)
