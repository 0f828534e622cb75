"""Class-specific residual attention (CSRA): a classification head for multi-label recognition.

Paper: "Residual Attention: A Simple but Effective Method for Multi-Label Recognition", Ke Zhu, Jianxin Wu,
ICCV 2021, arXiv:2108.02456 (https://arxiv.org/abs/2108.02456).

From the un-pooled feature map x [C, N] (N = H·W positions) and a classifier ``m_i`` per class i (a 1×1 conv
without bias), the score of class i at position j is ``s_ij = m_iᵀ x_j``. The head adds to the class-agnostic
average-pooled logit a class-specific attention logit:

``y_i = mean_j s_ij + λ Σ_j softmax_j(T s_ij) s_ij``,

which is the paper's ``m_iᵀ (g + λ a^i)`` with ``g`` the average-pooled feature and ``a^i = Σ_j softmax_j(T s_ij) x_j``
the class-specific feature; as T → ∞ the attention logit becomes ``max_j s_ij`` (the paper's four-line version).
Multi-head CSRA sums H such heads, each with its own classifier and temperature and a shared λ. The temperatures per
number of heads follow the released code (Kevinz-code/CSRA, ``pipeline/csra.py``): H = 1: (1); 2: (1, ∞);
4: (1, 2, 4, ∞); 6: (1, 2, 3, 4, 5, ∞); 8: (1, 2, 3, 4, 5, 6, 7, ∞); other H need ``temperatures``. λ = 0.1 is the
released VOC2007 setting (one head); its COCO recipe uses λ = 0.5 with 4 or 6 heads.

The released code also divides each class's scores by the norm of its classifier, ``s_ij = m_iᵀ x_j / ‖m_i‖``, which
the paper's equations do not have: ``normalize=True``; the default follows the paper.

`with_csra_head` puts the head on a timm CNN whose ``forward_head`` pools and then classifies (ResNet and the like).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_channels, check_float, check_int, check_nchw

__all__ = ['CSRAHead', 'with_csra_head', 'CSRA_TEMPERATURES']

INF = float('inf')
# temperatures per number of heads, from the released code (T = ∞: max pooling)
CSRA_TEMPERATURES: dict[int, tuple[float, ...]] = {
    1: (1.,),
    2: (1., INF),
    4: (1., 2., 4., INF),
    6: (1., 2., 3., 4., 5., INF),
    8: (1., 2., 3., 4., 5., 6., 7., INF),
}


class CSRAHead(nn.Module):
    """Multi-head class-specific residual attention head.

    Args:
        in_features: channels C of the feature map.
        num_classes: number of classes K (>= 1).
        num_heads: number of heads H (default 1), each with its own classifier and temperature.
        lam: weight λ >= 0 of the attention logit (default 0.1).
        temperatures: the H softmax temperatures T > 0, ``float('inf')`` for max pooling; default: the paper's
            setting for H in 1, 2, 4, 6, 8 (see `CSRA_TEMPERATURES`).
        normalize: divide each class's scores by the norm of its classifier, as the released code (default False:
            the paper's equations).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] (the un-pooled features) -> [B, K] logits.
    """

    def __init__(
            self,
            in_features: int,
            num_classes: int,
            *,
            num_heads: int = 1,
            lam: float = 0.1,
            temperatures: Sequence[float] | None = None,
            normalize: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        self.in_features = check_channels(in_features, 'in_features')
        self.num_classes = check_int('num_classes', num_classes)
        self.num_heads = check_int('num_heads', num_heads)
        self.lam = check_float('lam', lam, 0., INF, high_open=True)
        if temperatures is None:
            if num_heads not in CSRA_TEMPERATURES:
                raise ValueError(
                    f'temperatures must be given for num_heads={num_heads}: the paper sets them for num_heads in '
                    f'{sorted(CSRA_TEMPERATURES)}')
            temperatures = CSRA_TEMPERATURES[num_heads]
        if isinstance(temperatures, (str, bytes)) or not isinstance(temperatures, Sequence):
            raise TypeError(f'temperatures must be a sequence of numbers, got {type(temperatures).__name__}')
        if len(temperatures) != num_heads:
            raise ValueError(f'temperatures must have num_heads={num_heads} entries, got {list(temperatures)}')
        self.temperatures = [check_float('temperatures', t, 0., INF, low_open=True) for t in temperatures]
        self.normalize = bool(normalize)
        # the H classifiers (1×1 convs without bias) stacked head by head: [H·K, C]
        self.weight = nn.Parameter(torch.empty(num_heads * num_classes, in_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default initialisation of a 1×1 conv (as the released code's ``nn.Conv2d``)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def extra_repr(self) -> str:
        return (f'in_features={self.in_features}, num_classes={self.num_classes}, num_heads={self.num_heads}, '
                f'lam={self.lam}, temperatures={self.temperatures}, normalize={self.normalize}')

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.in_features, 'CSRAHead')
        B = x.shape[0]
        ct = torch.promote_types(x.dtype, torch.float32)
        scores = torch.matmul(self.weight.to(x.dtype), x.flatten(2)).to(ct)  # [B, H·K, N]
        if self.normalize:
            scores = scores / torch.linalg.vector_norm(self.weight.to(ct), dim=1)[:, None]
        scores = scores.view(B, self.num_heads, self.num_classes, -1)
        logits = scores.mean(-1).sum(1)  # the heads' base logits: [B, K]
        for i, t in enumerate(self.temperatures):
            s = scores[:, i]  # [B, K, N]
            if math.isinf(t):
                att = s.amax(-1)
            else:
                att = (torch.softmax(s * t, dim=-1) * s).sum(-1)
            logits = logits + self.lam * att
        return logits.to(x.dtype)


def _classifier_name(model: nn.Module) -> str:
    """The attribute name of the model's classifier, a direct child (``fc`` of a ResNet)."""
    if not callable(getattr(model, 'get_classifier', None)):
        raise TypeError(f'with_csra_head needs a timm model with get_classifier(), got {type(model).__name__}')
    classifier = model.get_classifier()
    for name, child in model.named_children():
        if child is classifier:
            return name
    raise TypeError(
        f'with_csra_head: the classifier of {type(model).__name__} is not a direct child of the model (a head module '
        'with its own pooling and norm, as ConvNeXt or RegNet have); it supports models whose forward_head pools with '
        'model.global_pool and then applies the classifier, as ResNet does')


def _reset_csra_classifier(
        model: nn.Module, name: str, options: dict, num_classes: int, global_pool: str | None = None,
) -> None:
    """``reset_classifier`` of a model with a CSRA head: a new head for ``num_classes`` (>= 1), or, for 0, timm's
    pooled features (``global_pool``, default ``'avg'``) and no classifier."""
    from timm.layers import SelectAdaptivePool2d, create_classifier, get_device_dtype

    num_classes = check_int('num_classes', num_classes, 0)
    dd = get_device_dtype(model)
    if num_classes == 0:
        pool, head = create_classifier(model.num_features, 0, pool_type=global_pool or 'avg', **dd)
    else:
        if global_pool:
            raise ValueError(f'global_pool must be None with a CSRA head (the head pools itself), got {global_pool!r}')
        pool = SelectAdaptivePool2d(pool_type='')  # passes the feature map through
        head = CSRAHead(model.num_features, num_classes, **options, **dd)
    model.num_classes = num_classes
    model.global_pool = pool
    setattr(model, name, head)
    if hasattr(model, 'head_hidden_size'):
        model.head_hidden_size = model.num_features
    pool.train(model.training)
    head.train(model.training)


def with_csra_head(
        model: nn.Module,
        num_heads: int = 1,
        lam: float = 0.1,
        temperatures: Sequence[float] | None = None,
        normalize: bool = False,
) -> nn.Module:
    """Replace the global pooling and the classifier of a timm CNN by a `CSRAHead` (in place; returns the model).

    The model must pool in ``forward_head`` with ``model.global_pool`` (a timm ``SelectAdaptivePool2d``) and then
    classify with the classifier that ``get_classifier()`` returns, a direct child (ResNet's ``fc``, EfficientNet's
    ``classifier``). Afterwards ``global_pool`` passes the feature map through and the classifier attribute holds the
    CSRA head (its weight under the classifier's key, e.g. ``fc.weight`` [H·K, C]), so that ``model(x)`` and
    ``model.forward_head(features)`` return the CSRA logits [B, K]; ``forward_head(features, pre_logits=True)``
    returns the un-pooled feature map (there is no class-agnostic pre-logit vector), and the model's head dropout,
    if any, drops features of the map. ``model.reset_classifier(num_classes)`` builds a new CSRA head with the same
    options; ``reset_classifier(0)`` gives timm's pooled features (average pooling by default).

    The new head is freshly initialised: the old classifier's weights are not reused.

    Args:
        model: a timm CNN (ResNet and the like) with ``num_classes`` >= 0.
        num_heads, lam, temperatures, normalize: the options of `CSRAHead`.
    """
    from timm.layers import SelectAdaptivePool2d

    if not isinstance(model, nn.Module):
        raise TypeError(f'model must be an nn.Module, got {type(model).__name__}')
    if not isinstance(getattr(model, 'global_pool', None), SelectAdaptivePool2d):
        raise TypeError(
            f'with_csra_head needs a model that pools with model.global_pool (timm SelectAdaptivePool2d) before its '
            f'classifier, as ResNet does; {type(model).__name__} has global_pool='
            f'{type(getattr(model, "global_pool", None)).__name__}')
    if getattr(model.global_pool, 'input_fmt', 'NCHW') != 'NCHW' or not isinstance(model.num_features, int):
        raise TypeError(f'with_csra_head needs NCHW features and an int num_features, got {type(model).__name__}')
    name = _classifier_name(model)
    options = dict(num_heads=num_heads, lam=lam, temperatures=temperatures, normalize=normalize)
    CSRAHead(model.num_features, 1, **options, device='meta')  # checks the options, also when num_classes is 0
    reset = functools.partial(_reset_csra_classifier, model, name, options)
    if model.num_classes:
        reset(model.num_classes)
    model.reset_classifier = reset
    return model
