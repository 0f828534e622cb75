"""ResNets whose 3×3 convs train as re-parameterisable blocks and deploy as single convs, registered with timm.

- ``resnet18_acnet``, ``resnet50_acnet``: every 3×3 conv of the residual blocks, with its batch norm, is an
  asymmetric convolution block (3×3 + 1×3 + 3×1 conv-BN; "ACNet", arXiv:1908.03930).
- ``resnet18_dbb``, ``resnet50_dbb``: every such conv is a Diverse Branch Block (3×3, 1×1, 1×1–AVG and 1×1–3×3
  branches; "Diverse Branch Block", arXiv:2103.13425). The DBB paper's Table 2 reports ImageNet top-1 69.54 ->
  70.99 (ResNet-18) and 76.14 -> 76.71 (ResNet-50) with DBB, 70.53 / 76.46 with ACB.

As the released code of both papers (DingXiaoH/DiverseBranchBlock, ``convnet_utils.py``: kernels of size 1 and
>= 7 stay conv-BN), the stem's 7×7 conv, the 1×1 convs and the downsampling convs stay timm's conv + BN: a
ResNet-18 has its two 3×3 convs per block replaced, a ResNet-50 its one. The replaced conv's batch norm becomes the
block's own (``bn1``/``bn2`` are identities) and the ReLU after it stays where timm has it. The papers publish no
parameter count of these training-time ResNets (only accuracies); the tests derive them from the branches.

`visattn.reparameterize(model)` turns every block into one 3×3 conv with bias (``convN.reparam_conv``): the
deployed network is timm's ResNet with those batch norms folded, so it has ``Σ C_out`` fewer parameters than timm's
(each folded batch norm's 2·C_out become the conv's C_out biases), and computes what the training form computes in
eval mode; ``timm.create_model(name, deploy=True)`` builds that form directly, so a deployed state dict loads.
timm's plain ResNet weights load into the training form with ``strict=False`` for everything but the replaced convs
and their norms (``layerI.J.conv2.weight``, ``bn2.*``), which the blocks hold under their own names.

Weights are initialised as timm's ResNet (Kaiming normal, fan-out) for every conv of every branch, except DBB's
identity-based 1×1 conv, which starts at the identity; ``zero_init_last`` (timm's default) sets the final batch
norm of every branch of a BasicBlock's second conv to 0 (a Bottleneck's last norm is the plain ``bn3``).
"""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar

import torch.nn as nn
from timm.models import generate_default_cfgs
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from ..layers.acnet import AsymConvBlock
from ..layers.dbb import DiverseBranchBlock
from ._builder import build_checked, default_cfg, make_entrypoint, paper_id

__all__ = ['RepBasicBlock', 'RepBottleneck']


class _RepConvs:
    """Replaces the (conv, norm) pairs ``rep_pairs`` of a timm residual block by ``rep_layer`` blocks with the same
    geometry (channels, stride, dilation, groups); the norm becomes an identity (the block ends with its own)."""

    rep_pairs: ClassVar[tuple[tuple[str, str], ...]] = ()

    def replace_convs(self, rep_layer: Any, dd: dict[str, Any]) -> None:
        if rep_layer is None:
            raise ValueError(f'{type(self).__name__} needs rep_layer=, the re-parameterisable block class')
        for conv_name, norm_name in self.rep_pairs:
            conv = getattr(self, conv_name)
            setattr(self, conv_name, rep_layer(
                conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size[0],
                stride=conv.stride[0], dilation=conv.dilation[0], groups=conv.groups, **dd))
            setattr(self, norm_name, nn.Identity())


class RepBasicBlock(_RepConvs, BasicBlock):
    """timm's ``BasicBlock`` whose two 3×3 conv-BN pairs are ``rep_layer`` blocks (``conv1``, ``conv2``)."""

    rep_pairs = (('conv1', 'bn1'), ('conv2', 'bn2'))

    def __init__(self, *args: Any, rep_layer: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.replace_convs(rep_layer, dict(device=kwargs.get('device'), dtype=kwargs.get('dtype')))

    def zero_init_last(self) -> None:
        """Zero the last batch norm of every branch of ``conv2``: the residual branch starts at 0, as timm's."""
        self.conv2.init_gamma(0.)


class RepBottleneck(_RepConvs, Bottleneck):
    """timm's ``Bottleneck`` whose 3×3 conv-BN pair is a ``rep_layer`` block (``conv2``)."""

    rep_pairs = (('conv2', 'bn2'),)

    def __init__(self, *args: Any, rep_layer: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.replace_convs(rep_layer, dict(device=kwargs.get('device'), dtype=kwargs.get('dtype')))


_BLOCKS = {'acnet': (AsymConvBlock, '1908.03930'), 'dbb': (DiverseBranchBlock, '2103.13425')}
_DEPTHS = {18: (RepBasicBlock, (2, 2, 2, 2)), 50: (RepBottleneck, (3, 4, 6, 3))}

# name -> (ResNet arguments, arXiv id)
_MODELS: dict[str, tuple[dict[str, Any], str]] = {
    f'resnet{depth}_{name}': (dict(block=_DEPTHS[depth][0], layers=_DEPTHS[depth][1], rep_layer=layer), arxiv)
    for name, (layer, arxiv) in _BLOCKS.items()
    for depth in (18, 50)
}

default_cfgs = generate_default_cfgs({name: default_cfg(arxiv) for name, (_, arxiv) in _MODELS.items()})


def _create(variant: str, pretrained: bool = False, *, deploy: bool = False, **kwargs: Any) -> ResNet:
    """``deploy=True`` builds the deploy form directly (each block one conv with bias), so that the state dict of a
    model converted by `visattn.reparameterize` loads into it."""
    if not isinstance(deploy, bool):
        raise TypeError(f'deploy must be a bool, got {type(deploy).__name__} {deploy!r}')
    args = dict(_MODELS[variant][0])
    layer = args.pop('rep_layer')
    block_args = dict(rep_layer=partial(layer, deploy=True) if deploy else layer)
    block_args.update(kwargs.pop('block_args', None) or {})
    return build_checked(ResNet, variant, pretrained, block_args=block_args, **dict(args, **kwargs))


for _name, (_args, _arxiv) in _MODELS.items():
    make_entrypoint(_name, __name__, _create, f'{_name} ({paper_id(_arxiv)}); see the docstring of {__name__}.')
