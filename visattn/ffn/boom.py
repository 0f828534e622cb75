"""SHA-RNN's Boom layer in a ViT's feed-forward slot.

Paper: "Single Headed Attention RNN: Stop Thinking With Your Head", Stephen Merity, arXiv 2019, arXiv:1911.11423
(https://arxiv.org/abs/1911.11423). Released code: Smerity/sha-rnn (``model.py``, class ``Boom``).

The Boom layer takes a token from small to big and back to small without a second matrix: an up-projection to
``D = m · C'`` features, the activation, then the ``m`` chunks of ``C'`` features summed,

    h = act(W₁ x + b₁) ∈ R^{m·C'},     y_c = Σ_{j=0}^{m-1} h_{j·C' + c},   c = 0 .. C' - 1,

with ``C'`` the output width (the input width in the paper, where ``C' = C``). Against a two-layer MLP it saves the
``D × C'`` down-projection and its compute. ``shortcut=False`` gives the released class's other branch, the plain
``W₂ act(W₁ x + b₁) + b₂``.

Choices, and where the paper and the released code differ:
- ``shortcut=True`` (the chunk sum) is the default, as SHA-RNN's blocks build the layer
  (``Boom(embed_dim, hidden_dim, dropout, shortcut=True)``); the released class's own default is False.
- The released code trims the hidden features to a multiple of the chunk width at every call
  (``torch.narrow``), leaving the trimmed units' weights unused; here ``hidden_features`` is rounded down to a
  multiple of ``out_features`` at construction (same output, no dead weights) and must be at least
  ``out_features``. ``hidden_features`` defaults to ``4 · out_features`` (the paper's 1024 -> 4096), timm's ViT
  passes ``mlp_ratio · C``.
- Activation: timm's ``act_layer`` (``nn.GELU`` by default, as timm's ViT passes); the released code's GELU is the
  sigmoid approximation ``x · σ(1.702 x)``, timm's ``QuickGELU`` (``act_layer=timm.layers.QuickGELU``).
- Dropout: the released code drops the hidden features after the activation; timm's ``drop`` (or a pair) drops
  there and after the output, as timm's ``Mlp``. ``norm_layer`` (timm's ``scale_mlp_norm``) normalises the hidden
  features before the chunk sum (timm's ``Mlp``: before ``fc2``).

Computed in the module's dtype, as timm's ``Mlp`` (PyTorch accumulates the 16-bit chunk sum in float32).
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from .._utils import check_int, get_act
from ..registry import register
from ._base import check_features, feature_pair, optional_features

__all__ = ['Boom']


@register(
    'boom', paper='Single Headed Attention RNN: Stop Thinking With Your Head', arxiv='1911.11423', year=2019,
    family='mlp', complexity='O(N·C·D)', kind='ffn',
)
class Boom(nn.Module):
    """The Boom feed-forward layer: ``[..., in_features] -> [..., out_features]``; usable as timm's ``mlp_layer=``.

    Args:
        in_features: channels C of the tokens.
        hidden_features: width D of the up-projection (default ``4 · out_features``); with ``shortcut`` rounded
            down to a multiple of ``out_features``.
        out_features: output width C' (default ``in_features``), the chunk width.
        act_layer: activation after the up-projection (a class or a timm name).
        norm_layer: norm of the hidden features; None for none.
        bias: bias of ``fc1`` (and of ``fc2`` without ``shortcut``); a pair gives one each.
        drop: dropout after the activation and after the output; a pair gives one each.
        shortcut: the chunk sum (the paper's Boom); False for a down-projection ``fc2`` (an ``Mlp``).
        device, dtype: factory arguments.

    Shapes:
        x: [..., in_features] -> [..., out_features].
    """

    def __init__(
            self,
            in_features: int,
            hidden_features: int | None = None,
            out_features: int | None = None,
            act_layer: type[nn.Module] | str | None = nn.GELU,
            norm_layer: type[nn.Module] | None = None,
            bias: bool | tuple[bool, bool] = True,
            drop: float | tuple[float, float] = 0.,
            *,
            shortcut: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.in_features = check_int('in_features', in_features)
        self.out_features = optional_features('out_features', out_features, in_features)
        hidden = optional_features('hidden_features', hidden_features, 4 * self.out_features)
        bias_pair = feature_pair('bias', bias)
        drop_pair = feature_pair('drop', drop)
        self.shortcut = bool(shortcut)
        if self.shortcut:
            if hidden < self.out_features:
                raise ValueError(
                    f'hidden_features must be at least out_features={self.out_features} (the Boom layer sums '
                    f'chunks of out_features), got {hidden!r}')
            hidden -= hidden % self.out_features
        self.hidden_features = hidden
        self.chunks = hidden // self.out_features

        self.fc1 = nn.Linear(in_features, hidden, bias=bias_pair[0], **dd)
        self.act = get_act(act_layer)
        self.drop1 = nn.Dropout(drop_pair[0])
        self.norm = norm_layer(hidden, **dd) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Identity() if self.shortcut else nn.Linear(hidden, self.out_features, bias=bias_pair[1], **dd)
        self.drop2 = nn.Dropout(drop_pair[1])

    def forward(self, x: Tensor) -> Tensor:
        check_features(x, self.in_features, 'Boom')
        h = self.norm(self.drop1(self.act(self.fc1(x))))  # [..., D]
        if self.shortcut:
            y = h.reshape(list(h.shape[:-1]) + [self.chunks, self.out_features]).sum(-2)  # the m chunks summed
        else:
            y = self.fc2(h)
        return self.drop2(y)
