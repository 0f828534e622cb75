"""The timm model interface shared by the hierarchical (4-stage) backbones: ShiftViT, sMLPNet, DAT.

A subclass builds ``patch_embed``, ``stages`` (an ``nn.Sequential`` of stages with a ``grad_checkpointing`` flag), the
final ``norm``, a timm ``ClassifierHead`` ``head``, ``feature_info`` and ``num_features``; every map is NCHW.
No ``from __future__ import annotations`` here: timm's FX + TorchScript test scripts these methods' annotations.
"""

from typing import Any

import torch
import torch.nn as nn
from timm.layers import get_device_dtype
from timm.models._features import feature_take_indices
from torch import Tensor

__all__ = ['StagedNet', 'prune_isotropic']


def prune_isotropic(model: nn.Module, indices: int | list[int], prune_norm: bool, prune_head: bool) -> list[int]:
    """``prune_intermediate_layers`` of an isotropic network (GFNet, S²-MLP: ``blocks``, ``norm``,
    ``reset_classifier``): drop the blocks after the last one in ``indices``, and the norm and head if asked."""
    take_indices, max_index = feature_take_indices(len(model.blocks), indices)
    model.blocks = model.blocks[:max_index + 1]
    if prune_norm:
        model.norm = nn.Identity()
    if prune_head:
        model.reset_classifier(0, '')
    return take_indices


class StagedNet(nn.Module):
    """Base of the NCHW four-stage backbones: group matching, grad checkpointing, classifier reset, intermediates,
    pruning, ``forward_features`` / ``forward_head`` / ``forward``."""

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r'^patch_embed',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
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

    def forward_intermediates(
            self,
            x: Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """The stage outputs (strides 4, 8, 16, 32) as NCHW maps, and the final features.

        Args:
            x: [B, C, H, W] images.
            indices: the last n stages if an int, these stages if a sequence, all if None.
            norm: apply the final norm to the last stage's map.
            stop_early: stop after the last stage taken.
            output_fmt: ``'NCHW'``.
            intermediates_only: return only the intermediates.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        last = len(self.stages) - 1
        intermediates = []
        x = self.patch_embed(x)
        i = 0
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm and i == last else x)
        if intermediates_only:
            return intermediates
        if i == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last one in ``indices`` (and the norm and head where they go with them)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()  # sized for the last stage only
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        """[B, C, H, W] images -> the normalised last map [B, num_features, H/32, W/32]."""
        return self.norm(self.stages(self.patch_embed(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
