"""timm's feature-extraction and model interface, shared by visattn's isotropic and hierarchical backbones.

`FeatureIntermediates` gives timm's ``forward_intermediates`` and ``prune_intermediate_layers`` once for three
layouts of taps (the entries of ``feature_info``), chosen by two class constants:

- isotropic (``_fi_isotropic``: GFNet, AFNONet, S²-MLP): the taps are the blocks of ``blocks``, run one by one
  (gradient checkpointing per block with the model's ``grad_checkpointing``); ``norm`` applies to every tap;
- stages (the default: NAT, GFNet-H, ShiftViT, sMLPNet, DAT): the taps are the stages of ``stages``, each run whole
  (a stage checkpoints its own blocks); ``norm`` applies to the last stage's tap only;
- blocks of every stage (``_fi_block_taps``: S²-MLPv2): the taps are the blocks of ``stages[i].blocks``, numbered
  over all stages, each stage's ``downsample`` run before its first block (checkpointing per block with the stage's
  ``grad_checkpointing``); ``norm`` applies to the taps of the last stage only.

``_embed(x)`` (default ``patch_embed(x)``) makes the first map and ``_finish(x)`` (default ``norm(x)``) the final
features from the last one; ``_fi_nhwc`` says the maps are [B, H, W, C] inside (then ``output_fmt='NCHW'``
permutes them); ``_fi_formats`` lists the ``output_fmt`` a model accepts. The constants are TorchScript constants,
so a scripted model (or timm's ``FeatureGetterNet`` around it) compiles only its own branch.

`ClassifierNet` gives the rest of timm's interface on the same constants, for every layout: ``group_matcher`` (the stem
``_group_stem``), ``set_grad_checkpointing``, ``forward_features`` (``_embed``, the blocks or stages, ``_finish``),
``forward_head``, ``forward``, and ``get_classifier`` / ``reset_classifier`` over a timm ``ClassifierHead`` ``head``,
which ``_init_head`` builds with the final ``norm`` and timm's attributes (``output_fmt`` is ``'NHWC'`` where
``_fi_nhwc``). `StagedNet` is the same for the hierarchical backbones: a subclass builds ``patch_embed``, ``stages``
(an ``nn.Sequential`` of `Stage`: ``downsample``, ``blocks``, a ``grad_checkpointing`` flag) and ``feature_info``,
then calls ``_init_head`` (or sets ``norm``, ``head`` and the attributes itself). `drop_path_rates` is the
stochastic-depth rule that most backbones share; `rename_level_keys` maps the checkpoints whose patch merging
closes each level (NAT, ShiftViT). No ``from __future__ import annotations`` here: timm's FX +
TorchScript test scripts these methods' annotations.
"""

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, get_device_dtype
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint, checkpoint_seq
from torch import Tensor

__all__ = ['ClassifierNet', 'FeatureIntermediates', 'Stage', 'StagedNet', 'drop_path_rates', 'rename_level_keys']


class FeatureIntermediates:
    """Mixin of an ``nn.Module`` backbone: timm's ``forward_intermediates`` and ``prune_intermediate_layers`` over
    its taps (see the module docstring for the three layouts and the class constants that choose them)."""

    __constants__ = ['_fi_isotropic', '_fi_block_taps', '_fi_nhwc', '_fi_formats']
    _fi_isotropic: bool = False
    _fi_block_taps: bool = False
    _fi_nhwc: bool = False
    _fi_formats: tuple[str, ...] = ('NCHW',)

    def _embed(self, x: Tensor) -> Tensor:
        return self.patch_embed(x)

    def _finish(self, x: Tensor) -> Tensor:
        return self.norm(x)

    def _num_taps(self) -> int:
        if self._fi_isotropic:
            return len(self.blocks)
        if self._fi_block_taps:
            n = 0
            for stage in self.stages:
                n += len(stage.blocks)
            return n
        return len(self.stages)

    def _tap(self, x: Tensor, normed: bool, output_fmt: str) -> Tensor:
        feat = self.norm(x) if normed else x
        if self._fi_nhwc and output_fmt == 'NCHW':
            feat = feat.permute(0, 3, 1, 2)
        return feat

    def forward_intermediates(
            self,
            x: Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """The maps at the chosen taps (the entries of ``feature_info``), and the final features.

        Args:
            x: [B, C, H, W] images.
            indices: the last n taps if an int, these taps if a sequence, all if None.
            norm: apply the final norm to the taps of the last stage (to every tap of an isotropic network).
            stop_early: stop after the last tap taken (the final features are then that map, normalised only if
                the last stage was reached).
            output_fmt: ``'NCHW'`` (every model) or ``'NHWC'`` (the models whose maps are NHWC inside, where listed
                in ``_fi_formats``).
            intermediates_only: return only the intermediates.

        Returns:
            The intermediates, a list of [B, C_i, H_i, W_i] maps (or [B, H_i, W_i, C_i] for ``'NHWC'``), and before
            them, unless ``intermediates_only``, the final features in the model's ``output_fmt`` (those of
            ``forward_features`` when every tap was run).
        """
        if output_fmt not in self._fi_formats:
            expected = ' or '.join([f"'{fmt}'" for fmt in self._fi_formats])
            raise ValueError(f"output_fmt must be {expected}, got '{output_fmt}'")
        take_indices, max_index = feature_take_indices(self._num_taps(), indices)
        stop = max_index if stop_early else self._num_taps() - 1
        intermediates: list[Tensor] = []
        x = self._embed(x)
        in_last = True
        if self._fi_isotropic:
            for i, blk in enumerate(self.blocks):
                if i <= stop:
                    if self.grad_checkpointing and not torch.jit.is_scripting():
                        x = checkpoint(blk, x)
                    else:
                        x = blk(x)
                    if i in take_indices:
                        intermediates.append(self._tap(x, norm, output_fmt))
        else:
            last = len(self.stages) - 1
            index = 0
            for s, stage in enumerate(self.stages):
                if index <= stop:
                    in_last = s == last
                    if self._fi_block_taps:
                        x = stage.downsample(x)
                        for blk in stage.blocks:
                            if index <= stop:
                                if stage.grad_checkpointing and not torch.jit.is_scripting():
                                    x = checkpoint(blk, x)
                                else:
                                    x = blk(x)
                                if index in take_indices:
                                    intermediates.append(self._tap(x, norm and in_last, output_fmt))
                            index += 1
                    else:
                        x = stage(x)
                        if index in take_indices:
                            intermediates.append(self._tap(x, norm and in_last, output_fmt))
                        index += 1
        if intermediates_only:
            return intermediates
        return (self._finish(x) if in_last else x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the taps after the last one in ``indices``, and the norm and head if asked; where whole stages go,
        the norm (sized for the last stage only) and the head go with them and ``num_features`` becomes the kept
        tap's width. Returns the indices of the taps to take."""
        take_indices, max_index = feature_take_indices(self._num_taps(), indices)
        if self._fi_isotropic:
            self.blocks = self.blocks[:max_index + 1]
            keep = 0
        elif self._fi_block_taps:
            keep, first = 0, 0
            while max_index >= first + len(self.stages[keep].blocks):
                first += len(self.stages[keep].blocks)
                keep += 1
            self.stages[keep].blocks = self.stages[keep].blocks[:max_index - first + 1]
        else:
            keep = max_index
        prune_end = not self._fi_isotropic and keep < len(self.stages) - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if not self._fi_isotropic:
            self.stages = self.stages[:keep + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices


class Stage(nn.Module):
    """A stage of a hierarchical backbone: ``self.downsample`` (a patch merging or ``nn.Identity``), then
    ``self.blocks`` (an ``nn.Sequential``), both set by the subclass; timm's gradient checkpointing over the
    blocks when ``grad_checkpointing`` is set (``_run_blocks``, for a subclass's own ``forward``)."""

    def __init__(self) -> None:
        super().__init__()
        self.grad_checkpointing = False

    def _run_blocks(self, x: Tensor) -> Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward(self, x: Tensor) -> Tensor:
        return self._run_blocks(self.downsample(x))


class ClassifierNet(FeatureIntermediates, nn.Module):
    """timm's model interface of a backbone laid out as `FeatureIntermediates` says (isotropic ``blocks`` or
    ``stages``): group matching, gradient checkpointing, ``forward_features`` / ``forward_head`` / ``forward`` and
    the classifier (``_init_head``, ``get_classifier``, ``reset_classifier``)."""

    _group_stem: str = r'^patch_embed'

    def _init_head(self, norm: nn.Module, num_features: int, in_chans: int, num_classes: int, global_pool: str,
                   drop_rate: float, head: nn.Module | None = None, device=None, dtype=None) -> None:
        """Set timm's attributes, the final ``norm`` and the ``head``: a timm ``ClassifierHead`` over
        ``num_features`` channels of ``output_fmt`` maps (``'NHWC'`` where ``_fi_nhwc``, else ``'NCHW'``), or the
        ``head`` given (one with ``ClassifierHead``'s ``fc``, ``reset`` and ``num_features``)."""
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.output_fmt = 'NHWC' if self._fi_nhwc else 'NCHW'
        self.num_features = self.head_hidden_size = num_features
        self.norm = norm
        if head is None:
            head = ClassifierHead(num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                  input_fmt=self.output_fmt, device=device, dtype=dtype)
        self.head = head

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        if self._fi_isotropic:
            return dict(stem=self._group_stem, blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))])
        return dict(
            stem=self._group_stem,
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if self._fi_isotropic:
            self.grad_checkpointing = enable
        else:
            for stage in self.stages:
                stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool, in_features=self.num_features, **get_device_dtype(self))
        self.head_hidden_size = self.head.num_features
        if global_pool is not None:
            self.global_pool = global_pool

    def forward_features(self, x: Tensor) -> Tensor:
        """[B, C, H, W] images -> the normalised last map ([B, num_features, H/s, W/s], or [B, H/s, W/s,
        num_features] where ``output_fmt`` is ``'NHWC'``; s the total stride)."""
        x = self._embed(x)
        if self._fi_isotropic:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(self.blocks, x)
            else:
                x = self.blocks(x)
        else:
            x = self.stages(x)
        return self._finish(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class StagedNet(ClassifierNet):
    """Base of the hierarchical backbones (NAT, ShiftViT, sMLPNet, DAT, Swin, S²-MLPv2, PoolFormer, MobileViT,
    VOLO): `ClassifierNet` over ``stages`` (see the module docstring for what a subclass builds)."""


def drop_path_rates(rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Stochastic depth growing linearly from 0 to ``rate`` over all ``sum(depths)`` blocks (the released
    ``linspace(0, rate, blocks)`` of most backbones), split per stage: one list of ``depths[i]`` rates per stage."""
    total = sum(depths)
    rates = [rate * i / max(total - 1, 1) for i in range(total)]
    return [rates[sum(depths[:i]):sum(depths[:i + 1])] for i in range(len(depths))]


def rename_level_keys(state_dict: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Map a checkpoint whose patch merging closes each level to the `StagedNet` layout (the released NAT and
    ShiftViT): ``<prefix>.i.blocks.*`` -> ``stages.i.blocks.*``, ``<prefix>.i.downsample.*`` ->
    ``stages.{i+1}.downsample.*``, ``head.*`` -> ``head.fc.*``. A ``{'model': ...}`` or ``{'state_dict': ...}``
    wrapper is unpacked; a state dict without ``<prefix>.`` keys passes as is."""
    state_dict = state_dict.get('model', state_dict)
    state_dict = state_dict.get('state_dict', state_dict)
    if not any(k.startswith(prefix + '.') for k in state_dict):
        return state_dict
    out = {}
    for key, value in state_dict.items():
        m = re.match(re.escape(prefix) + r'\.(\d+)\.(blocks|downsample)\.(.*)', key)
        if m:
            level, part, rest = int(m.group(1)), m.group(2), m.group(3)
            key = f'stages.{level}.blocks.{rest}' if part == 'blocks' else f'stages.{level + 1}.downsample.{rest}'
        elif key.startswith('head.'):
            key = 'head.fc.' + key[len('head.'):]
        out[key] = value
    return out

