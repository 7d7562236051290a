"""Learned gates on weights, as ``torch.nn.utils.parametrize`` parametrizations.

While a gate is attached the module computes its weight as ``W * gate`` (the supported
PyTorch way to reparametrise a weight; no forward is patched). Both gates end in an *exact*
mask from :mod:`sparsetorch.patterns` (any pattern: unstructured, N:M, channel, block), chosen from
the learned gate values.

* :class:`TopKGate` - straight-through top-k: learnable scores ``s`` (one per weight); the forward
  uses the exact mask ``pattern.mask(s, sparsity)``, the backward treats the mask as the identity in
  ``s`` (``dL/ds = dL/dW~ * W``), so the scores learn which weights matter while the network is
  exactly sparse at every step.
* :class:`HardConcreteGate` - the L0 gates of Louizos, Welling, Kingma (ICLR 2018): ``log_alpha``
  per group, ``u ~ U(0,1)``, ``s = sigmoid((log u - log(1-u) + log_alpha) / beta)``,
  ``z = clamp(s (zeta - gamma) + gamma, 0, 1)``; at evaluation ``z = clamp(sigmoid(log_alpha)
  (zeta - gamma) + gamma, 0, 1)``. The expected L0 norm is ``sum sigmoid(log_alpha - beta log(-gamma/zeta))``
  (:func:`expected_l0`); ``beta`` (the temperature) is set by the caller's schedule.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..patterns import Pattern, Unstructured
from .groups import Grouping

__all__ = ["TopKGate", "HardConcreteGate", "expected_l0", "expected_l0_grad", "GAMMA", "ZETA"]

GAMMA, ZETA = -0.1, 1.1


class TopKGate(nn.Module):
    """``W -> W * M`` with ``M = pattern.mask(scores, sparsity)`` and a straight-through gradient to
    ``scores``. ``refresh()`` recomputes ``M`` (call it after the scores or the sparsity change)."""

    def __init__(self, weight: Tensor, pattern: Pattern | None = None, sparsity: float = 0.0) -> None:
        super().__init__()
        w = weight.detach().abs().float()
        self.scores = nn.Parameter(w / w.mean().clamp_min(1e-12))
        self.pattern = pattern or Unstructured()
        self.sparsity = float(sparsity)
        self.register_buffer("mask", torch.ones_like(weight, dtype=torch.bool), persistent=False)
        self.refresh()

    @torch.no_grad()
    def refresh(self, sparsity: float | None = None) -> Tensor:
        """Recompute the exact mask from the scores (at ``sparsity`` if given); returns it."""
        if sparsity is not None:
            self.sparsity = float(sparsity)
        fixed = self.pattern.fixed_sparsity
        if fixed is None and self.sparsity <= 0:
            self.mask = torch.ones_like(self.scores, dtype=torch.bool)
        else:
            self.mask = self.pattern.mask(self.scores, None if fixed is not None else self.sparsity)
        return self.mask

    def forward(self, w: Tensor) -> Tensor:
        m = self.mask.to(w.dtype)
        ste = m + (self.scores - self.scores.detach()).to(w.dtype)  # value m, d/dscores = 1
        return w * ste


def expected_l0(log_alpha: Tensor, beta: float) -> Tensor:
    """``sum sigmoid(log_alpha - beta * log(-gamma / zeta))``: the expected number of open gates."""
    return torch.sigmoid(log_alpha - beta * math.log(-GAMMA / ZETA)).sum()


def expected_l0_grad(log_alpha: Tensor, beta: float) -> Tensor:
    """Closed-form gradient of :func:`expected_l0` with respect to ``log_alpha``."""
    p = torch.sigmoid(log_alpha - beta * math.log(-GAMMA / ZETA))
    return p * (1 - p)


class HardConcreteGate(nn.Module):
    """``W -> W * z`` with hard-concrete gates ``z`` (one per group of ``grouping``)."""

    def __init__(self, weight: Tensor, grouping: Grouping | None = None, *, init_keep: float = 0.9,
                 beta: float = 2 / 3, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.grouping = grouping or Grouping("element")
        self.shape = tuple(weight.shape)
        n = self.grouping.n_groups(self.shape)
        g = generator
        init = math.log(init_keep / (1 - init_keep))
        noise = torch.randn(n, generator=g) * 0.01
        self.log_alpha = nn.Parameter((init + noise).to(weight.device))
        self.beta = float(beta)
        self.generator = generator

    def _expand(self, z: Tensor) -> Tensor:
        return self.grouping.expand(z, self.shape)

    def sample(self) -> Tensor:
        """A training-mode gate sample ``z`` in ``[0, 1]`` (per group)."""
        u = torch.rand(self.log_alpha.shape, generator=self.generator).clamp(1e-6, 1 - 1e-6)
        u = u.to(self.log_alpha.device)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return torch.clamp(s * (ZETA - GAMMA) + GAMMA, 0, 1)

    def deterministic(self) -> Tensor:
        """The evaluation gate ``clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)`` (per group)."""
        return torch.clamp(torch.sigmoid(self.log_alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def forward(self, w: Tensor) -> Tensor:
        z = self.sample() if self.training else self.deterministic()
        return w * self._expand(z).to(w.dtype)
