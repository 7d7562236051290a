"""Mask-decay gradient flow for N:M (MdGf, Bambhaniya et al. 2024; ALGORITHMS.md E.3).

The forward uses ``W ⊙ (M + (1 − M)·β_t)``: weights outside the current N:M mask are scaled
by a decaying ``β_t`` instead of being zeroed, and the gradient reaches the dense weights
unmasked. ``β`` is 1 during ``dense_steps``, then decays (``decay_type="exp"``:
``β = exp(−c·t)``; ``"linear"``: ``β = max(0, 1 − c·t)``, ``t`` counted from the end of the warm-up)
and is exactly 0 for the last ``finetune_steps`` (default 25% of the run), where the model is
N:M sparse. The default ``decay_coef`` makes ``β`` reach 0.01 (exp) or 0 (linear) when
fine-tuning starts; the paper's ViT recipe uses ``exp`` with ``1e-4`` per step.

While ``β > 0`` the model is not yet sparse, so :attr:`masks` are all-ones (``verify`` holds);
:attr:`target_masks` are the N:M masks the decay is heading to. From the first step with
``β = 0`` on, :attr:`masks` are those N:M masks and are enforced like STE's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import MethodError
from ..masks import MaskSet
from ..patterns import NM, Unstructured
from ._nm import NMSparsifier
from .base import Batches, register_method

DECAY_TYPES = ("exp", "linear")


@register_method("nm_decay")
class NMDecay(NMSparsifier):
    """N:M training whose pruned weights fade out (``β_t``) instead of being cut at once."""

    def __init__(
        self,
        pattern: str | NM = "2:4",
        *,
        decay_type: str = "exp",
        decay_coef: float | None = None,
        dense_steps: int = 0,
        finetune_steps: int | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(pattern, **kw)
        if self.decay > 0:
            raise MethodError("nm_decay has its own decay of the pruned weights; SR-STE's decay is not used here.")
        self._set_phases(dense_steps, finetune_steps, "its decay and fine-tuning phases")
        if decay_type not in DECAY_TYPES:
            raise MethodError(f"decay_type must be one of {DECAY_TYPES}, got {decay_type!r}.")
        self.decay_type = decay_type
        if decay_coef is None:
            decay_coef = math.log(100.0) / self.span if decay_type == "exp" else 1.0 / self.span
        if not decay_coef > 0:
            raise MethodError(f"decay_coef must be > 0, got {decay_coef}.")
        self.decay_coef = float(decay_coef)
        self.target_masks: dict[str, Tensor] = {}
        self._beta_applied = 1.0

    def beta(self, step: int) -> float:
        """The scale of the weights outside the N:M mask for the steps after ``step``."""
        assert self.total_steps is not None
        if step < self.dense_steps:
            return 1.0
        if step >= self.total_steps - self.finetune_steps:
            return 0.0
        t = step - self.dense_steps
        if self.decay_type == "exp":
            return math.exp(-self.decay_coef * t)
        return max(0.0, 1.0 - self.decay_coef * t)

    def _target(self, w: Tensor) -> Tensor:
        return self.pattern.mask(w.abs(), None)

    def _dense_or_target(self, n: str, beta: float) -> tuple[Tensor, NM | Unstructured]:
        if beta > 0:
            return torch.ones_like(self.target_masks[n]), Unstructured()
        return self.target_masks[n], self.pattern

    def _write(self, beta: float) -> None:
        """Parameter ← W ⊙ (M + (1 − M)·β) from the dense shadow and the target masks."""
        for n, p in self.params.items():
            w, m = self.dense_weights[n], self.target_masks[n]
            p.copy_(torch.where(m, w, w * beta) if beta > 0 else w * m)
        self._beta_applied = beta

    # ---- lifecycle hooks
    def _initial_masks(self, data: Batches | None) -> MaskSet:
        masks, pats = {}, {}
        beta = self.beta(0)
        for n, p in self.params.items():
            self.dense_weights[n] = p.detach().clone()
            self.target_masks[n] = self._target(p.detach())
            masks[n], pats[n] = self._dense_or_target(n, beta)
        return MaskSet(masks, pats)

    def _enforce(self) -> None:
        assert self.masks is not None and self.model is not None
        with torch.no_grad():
            self._write(self.beta(self.step_count))

    def _update(self, step: int) -> bool:
        assert self.masks is not None
        old_beta = self._beta_applied
        for n, p in self.params.items():
            w, m = self.dense_weights[n], self.target_masks[n]
            # the optimizer moved p away from W ⊙ (M + (1 − M)β_old); that move goes to W
            applied = torch.where(m, w, w * old_beta)
            w.add_(p.detach() - applied)
            self.target_masks[n] = self._target(w)
        beta = self.beta(step)
        self._write(beta)
        changed = False
        for n in self.params:
            mask, pat = self._dense_or_target(n, beta)
            if self.masks.patterns[n] != pat:
                self.masks.patterns[n] = pat
                changed = True
            if not torch.equal(mask, self.masks[n]):
                changed = True
            self.masks.set(n, mask)
        return changed

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "beta_applied": self._beta_applied}

    def _load_extra_state(self, extra: Mapping[str, Any]) -> None:
        super()._load_extra_state(extra)
        for n in self.params:
            self.target_masks[n] = self._target(self.dense_weights[n])
            assert self.masks is not None
            self.masks.patterns[n] = self._dense_or_target(n, self.beta(self.step_count))[1]
        self._beta_applied = float(extra.get("beta_applied", self.beta(self.step_count)))

    def _on_detach(self) -> None:
        super()._on_detach()
        self.target_masks = {}
