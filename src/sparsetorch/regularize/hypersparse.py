"""HyperSparse (Glandorf, Kaiser, Rosenhahn, ICCV-W 2023) and its ART schedule (ALGORITHMS.md J.3).

``w`` are all targeted weights concatenated, ``kappa`` the target prune rate and ``|w|_(kappa)`` the
magnitude at index ``floor(kappa * n)`` of the ascending sorted ``|w|``; ``s = 0.6585 / |w|_(kappa)``
(so ``tanh(s |w|)`` crosses about 0.58 at the pruning boundary). The reference code
(``loss/HyperSparse.py``) writes the loss as

    L_HS = sum_i |w_i| * T / stopgrad(T) - sum_i |w_i|,     T = sum_j tanh(s |w_j|),  s constant,

whose value is 0 and whose gradient is

    dL_HS/dw_i = sign(w_i) * s * sech^2(s |w_i|) * ||w||_1 / T,

large for small weights (pushed to zero) and vanishing for large ones. :func:`hs_grad` computes it
in closed form (no autograd graph through every weight); the tests check it against autograd of
:func:`hs_loss`.

ART (adaptive regularisation training, ``utils/art.py``): after a dense warm-up, the loss
``L + lambda_e L_HS`` with ``lambda_e = lambda_init * eta^e`` grows every ART epoch ``e``; after each,
the globally magnitude-pruned copy is scored on training data; a buffer of the last ``2b + 1``
scores is averaged, the best average marks the buffer's middle model as the best pruned one, and
training stops once that best average exceeds the dense train accuracy. The best pruned model is
then fine-tuned with its mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import MethodError, check_sparsity

__all__ = ["HS_CONSTANT", "hs_scale", "hs_loss", "hs_grad", "ART", "ARTState"]

#: the reference's constant: ``tanh(0.6585) ~ 0.577``
HS_CONSTANT = 0.6585


def _flat_abs(weights: Sequence[Tensor]) -> Tensor:
    return torch.cat([w.detach().reshape(-1).abs().float() for w in weights])


def hs_scale(weights: Sequence[Tensor], kappa: float) -> float:
    """``s = 0.6585 / |w|_(kappa)``, the magnitude at index ``floor(kappa * n)`` of sorted ``|w|``."""
    kappa = check_sparsity(kappa, "kappa (prune rate)")
    a = _flat_abs(weights)
    idx = min(int(math.floor(kappa * a.numel())), a.numel() - 1)
    q = float(torch.kthvalue(a, idx + 1).values)  # (idx+1)-th smallest = index idx of the sorted list
    if q <= 0:
        # more than kappa of the weights are already zero: take the smallest non-zero magnitude
        nz = a[a > 0]
        q = float(nz.min()) if nz.numel() else 1.0
    return HS_CONSTANT / q


def hs_loss(weights: Sequence[Tensor], kappa: float, scale: float | None = None) -> Tensor:
    """The HyperSparse loss as the reference writes it (value ~0; use its gradient)."""
    s = hs_scale(weights, kappa) if scale is None else float(scale)
    w = torch.cat([x.reshape(-1) for x in weights])
    a = w.abs()
    t = torch.tanh(s * a)
    return (a * t.sum() / t.sum().detach() - a).sum()


@torch.no_grad()
def hs_grad(weights: Sequence[Tensor], kappa: float, scale: float | None = None) -> list[Tensor]:
    """Closed-form ``dL_HS/dw`` for every tensor of ``weights`` (same shapes and dtypes)."""
    s = hs_scale(weights, kappa) if scale is None else float(scale)
    l1 = sum(float(w.abs().double().sum()) for w in weights)
    total = sum(float(torch.tanh(s * w.abs().double()).sum()) for w in weights)
    if total <= 0:
        return [torch.zeros_like(w) for w in weights]
    c = s * l1 / total
    out = []
    for w in weights:
        sech2 = 1.0 - torch.tanh(s * w.abs().float()) ** 2
        out.append((torch.sign(w.float()) * sech2 * c).to(w.dtype))
    return out


@dataclass
class ARTState:
    """One entry of the ART buffer: the ART epoch, the pruned train accuracy and a payload (the
    pruned weights and masks, kept by the caller)."""

    epoch: int
    accuracy: float
    payload: Any = None


@dataclass
class ART:
    """The ART stop rule of the reference (``utils/art.py``), without any model code.

    Call :meth:`update` once per ART epoch with the pruned model's train accuracy and the dense
    model's; it returns True once training should stop. ``best`` is the buffer's middle entry at
    the best buffer average so far (before the buffer is full, its last entry, as the reference's
    ``min(len - 1, middle)``).
    """

    buffer_size: int = 1  # b: the buffer holds 2b + 1 entries
    buffer: list[ARTState] = field(default_factory=list)
    best: ARTState | None = None
    best_mean: float = 0.0
    epoch: int = 0
    terminated: bool = False

    def __post_init__(self) -> None:
        if int(self.buffer_size) < 0:
            raise MethodError(f"the ART buffer size b must be >= 0, got {self.buffer_size}.")

    @property
    def capacity(self) -> int:
        return 2 * int(self.buffer_size) + 1

    def update(self, pruned_accuracy: float, dense_accuracy: float, payload: Any = None) -> bool:
        """Record one ART epoch; return True when the best buffer average exceeds ``dense_accuracy``."""
        self.epoch += 1
        self.buffer.append(ARTState(self.epoch, float(pruned_accuracy), payload))
        if len(self.buffer) > self.capacity:
            self.buffer.pop(0)
        mean = sum(e.accuracy for e in self.buffer) / len(self.buffer)
        if mean > self.best_mean:
            self.best = self.buffer[min(len(self.buffer) - 1, self.capacity // 2)]
            self.best_mean = mean
        if self.best_mean > float(dense_accuracy):
            self.terminated = True
        return self.terminated

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers only (payloads are the caller's)."""
        return {"epoch": self.epoch, "best_mean": self.best_mean, "terminated": self.terminated,
                "buffer": [(e.epoch, e.accuracy) for e in self.buffer],
                "best": None if self.best is None else (self.best.epoch, self.best.accuracy)}
