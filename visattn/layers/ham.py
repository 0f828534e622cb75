"""Hamburger: global context by non-negative matrix factorisation (HamNet).

Paper: "Is Attention Better Than Matrix Decomposition?", Geng, Guo, Chen, Li, Wei, Lin, ICLR 2021, arXiv:2109.04553
(https://arxiv.org/abs/2109.04553). Released code: https://github.com/Gsunshine/Enjoy-Hamburger (``seg/HamNet/
hamburger``: ``HamburgerV1`` and ``NMF2D``; mmsegmentation's ``Hamburger`` of ``ham_head.py`` is the same block).

The lower bread is a 1×1 conv with bias and a ReLU, ``Z = ReLU(W_l x + b_l)`` (NMF needs a non-negative matrix); the
ham factorises each group of ``d = D / S`` channels, ``X ∈ R^{d×n}`` (n = H·W), as ``X ≈ B Cᵀ`` with bases
``B ∈ R^{d×r}`` and codes ``C ∈ R^{n×r}`` by multiplicative updates:

    C⁰ = softmax_r(t · Xᵀ B⁰),
    C ← C ⊙ (Xᵀ B) ⊘ (C Bᵀ B + ε),   B ← B ⊙ (X C) ⊘ (B Cᵀ C + ε)   (K steps),

then one more code update ``C ← C ⊙ (Xᵀ B) ⊘ (C Bᵀ B + ε)`` and the low-rank reconstruction ``X̄ = B Cᵀ``. The upper
bread is a 1×1 conv without bias and a norm, and the block ends as the released ``Hamburger``,
``y = ReLU(x + Norm(W_u X̄))``. Defaults as the released code: r = 64, S = 1, K = 6 steps in training and 7 in
evaluation, inverse temperature t = 1 (the NMF ham overrides the base class's 100), ε = 1e-6, D = C.

The bases start random for every forward, ``B⁰ ~ U(0, 1)`` normalised to unit columns, as the paper draws them; they
come from PyTorch's global generator (``torch.manual_seed`` fixes them), so that the default block is random in
evaluation too. ``rand_init=False`` keeps one fixed draw as a buffer instead (made at construction, where the released
code makes it at the first forward; its ``online_update`` of that buffer in evaluation is left out, so that
evaluation is deterministic).

One-step gradient (the paper's point, ``one_step_grad=True``): the K steps run on a detached X, so they record no
graph; only the final code update sees X with its gradient, B and C entering it as constants (the released code runs
the steps under ``torch.no_grad``). ``one_step_grad=False`` back-propagates through every step, as mmsegmentation's
and SegNeXt's copies do. Compute is in float32 at least (float64 stays float64). Cost O(n·r·d·K) per group.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_channels, check_float, check_int, check_nchw, conv_norm_act
from ..registry import register

__all__ = ['Hamburger']


@register(
    'ham', paper='Is Attention Better Than Matrix Decomposition?', arxiv='2109.04553', year=2021, family='context',
    complexity='O(N·R·C·K)',
)
class Hamburger(nn.Module):
    """Hamburger with the NMF ham: lower bread, NMF (one-step gradient), upper bread, residual and ReLU.

    Args:
        channels: input and output channels C.
        ham_channels: width D of the bread between the two 1×1 convs (default C, as the released code's MD_D = C).
        num_groups: S, channel groups factorised separately (D / S channels each; default 1).
        rank: number of bases r (default 64).
        train_steps: multiplicative-update steps K in training (default 6).
        eval_steps: steps in evaluation (default 7).
        inv_t: inverse temperature t of the initial codes' softmax (default 1, the NMF ham's).
        eps: the update's denominator guard ε (default 1e-6).
        rand_init: draw new random bases at every forward (default True, the paper); False keeps a fixed buffer.
        one_step_grad: gradient through the last code update only (default True, the paper); False through all.
        norm_layer: the upper bread's norm (default BatchNorm2d, the released PyTorch code; mmseg's configs use GN).
        device, dtype: factory arguments.

    Shapes:
        x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
            self,
            channels: int,
            *,
            ham_channels: int | None = None,
            num_groups: int = 1,
            rank: int = 64,
            train_steps: int = 6,
            eval_steps: int = 7,
            inv_t: float = 1.0,
            eps: float = 1e-6,
            rand_init: bool = True,
            one_step_grad: bool = True,
            norm_layer: type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.channels = check_channels(channels)
        self.ham_channels = channels if ham_channels is None else check_int('ham_channels', ham_channels)
        self.num_groups = check_int('num_groups', num_groups)
        if self.ham_channels % num_groups:
            raise ValueError(f'num_groups must divide ham_channels={self.ham_channels}, got {num_groups}')
        self.rank = check_int('rank', rank)
        self.train_steps = check_int('train_steps', train_steps)
        self.eval_steps = check_int('eval_steps', eval_steps)
        self.inv_t = check_float('inv_t', inv_t, 0., low_open=True)
        self.eps = check_float('eps', eps, 0., low_open=True)
        self.rand_init = bool(rand_init)
        self.one_step_grad = bool(one_step_grad)
        self.ham_in = conv_norm_act(channels, self.ham_channels, 1, **dd)
        self.ham_out = conv_norm_act(self.ham_channels, channels, 1, norm_layer=norm_layer, **dd)
        self.register_buffer('bases', None if rand_init else torch.empty(
            num_groups, self.ham_channels // num_groups, rank, **dd))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As the released code: conv weights N(0, 2/(k²·C_out)), unit norm; the fixed bases (if any) drawn anew."""
        for conv in (self.ham_in.conv, self.ham_out.conv):
            conv.reset_parameters()
            nn.init.kaiming_normal_(conv.weight, mode='fan_out', nonlinearity='relu')
        self.ham_out.bn.reset_parameters()
        if self.bases is not None:
            with torch.no_grad():
                self.bases.copy_(F.normalize(torch.rand_like(self.bases), dim=1))

    def _initial_bases(self, batch: int, depth: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """B⁰: [batch·S, d, r], random unit columns, or the fixed buffer repeated over the batch."""
        bases = self.bases
        if bases is None:
            return F.normalize(torch.rand(batch * self.num_groups, depth, self.rank, dtype=dtype, device=device), dim=1)
        return bases.to(dtype).unsqueeze(0).expand(batch, -1, -1, -1).reshape(batch * self.num_groups, depth, self.rank)

    def _update_codes(self, x: Tensor, bases: Tensor, coef: Tensor) -> Tensor:
        """C ⊙ (Xᵀ B) ⊘ (C Bᵀ B + ε): x [G, d, n], bases [G, d, r], coef [G, n, r]."""
        return coef * torch.bmm(x.transpose(1, 2), bases) / (torch.bmm(coef, torch.bmm(bases.transpose(1, 2), bases))
                                                            + self.eps)

    def nmf(self, z: Tensor) -> Tensor:
        """The ham: the low-rank reconstruction ``B Cᵀ`` of each channel group of ``z: [B, D, H, W]`` (non-negative)."""
        b, dim, h, w = z.shape
        depth = dim // self.num_groups
        x = z.to(torch.promote_types(z.dtype, torch.float32)).reshape(b * self.num_groups, depth, h * w)
        bases = self._initial_bases(b, depth, x.dtype, x.device)
        steps = self.train_steps if self.training else self.eval_steps
        xi = x.detach() if self.one_step_grad else x  # the steps on a detached X record no graph
        coef = torch.softmax(self.inv_t * torch.bmm(xi.transpose(1, 2), bases), dim=-1)  # C⁰: [G, n, r]
        for _ in range(steps):
            coef = self._update_codes(xi, bases, coef)
            bases = bases * torch.bmm(xi, coef) / (torch.bmm(bases, torch.bmm(coef.transpose(1, 2), coef)) + self.eps)
        if self.one_step_grad:
            bases, coef = bases.detach(), coef.detach()
        coef = self._update_codes(x, bases, coef)  # the one step that back-propagates to X
        return torch.bmm(bases, coef.transpose(1, 2)).reshape(b, dim, h, w).to(z.dtype)

    def forward(self, x: Tensor) -> Tensor:
        check_nchw(x, self.channels, 'Hamburger')
        enjoy = self.ham_out(self.nmf(F.relu(self.ham_in(x))))
        return F.relu(x + enjoy)
