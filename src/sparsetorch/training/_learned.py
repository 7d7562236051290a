"""Shared lifecycle of the learned-sparsity methods (ALGORITHMS.md §J, :mod:`sparsetorch.regularize`).

A learned method trains dense (all masks open) while a penalty, a proximal step or a gate decides
what to remove; at ``harden_at`` it chooses the *exact* mask (per-layer counts from the
allocation, shape from the pattern) from what it learned, and the rest of the run fine-tunes
with that mask enforced like any other method. ``harden_at`` defaults to 75% of
``total_steps`` (as GMP's end), and is at most ``total_steps``, so a run always ends sparse.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import MethodError
from ..masks import MaskSet
from ..patterns import Pattern, parse_pattern
from .base import Batches, Sparsifier, require_total_steps


class LearnedSparsifier(Sparsifier):
    """Dense until ``harden_at``, then an exact mask from :meth:`final_scores`, then fixed.

    Args:
        harden_at: optimizer step after which the mask is chosen (default ``0.75 * total_steps``).
        start: first step of the penalty (dense warm-up before it; default 0).
        pattern: shape of the final mask (``"unstructured"``, ``"2:4"``, ``"channel"``, ``"block4x4"``);
            an N:M pattern fixes the sparsity.
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        harden_at: int | None = None,
        start: int = 0,
        pattern: str | Pattern | None = None,
        **kw: Any,
    ) -> None:
        pat = parse_pattern(pattern)
        if pat.fixed_sparsity is not None:
            sparsity = pat.fixed_sparsity
            kw.setdefault("allocation", "uniform")
        super().__init__(sparsity, **kw)
        self.pattern = pat
        if harden_at is None:
            harden_at = max(1, int(0.75 * require_total_steps(self, "the step where the mask is chosen")))
        self.harden_at = int(harden_at)
        self.start = int(start)
        if self.harden_at < 1 or self.start < 0 or self.start >= self.harden_at:
            raise MethodError(
                f"{self.name}: need 0 <= start ({self.start}) < harden_at ({self.harden_at}); harden_at is the "
                "optimizer step after which the exact mask is chosen."
            )
        if self.total_steps is not None and self.harden_at > self.total_steps:
            raise MethodError(
                f"{self.name}: harden_at ({self.harden_at}) is after the last step ({self.total_steps}); the run "
                "would end without a sparse mask. Use harden_at <= total_steps."
            )
        self.hardened = False

    # ---- phases
    def active(self, step: int | None = None) -> bool:
        """Whether the penalty / gates act at ``step`` (default: the step now being taken)."""
        s = self.step_count + 1 if step is None else step
        return not self.hardened and self.start < s <= self.harden_at

    def final_scores(self) -> dict[str, Tensor]:
        """Scores (higher = keep) from which the exact mask is chosen; default ``|W|``."""
        return {n: p.detach().abs().float() for n, p in self.params.items()}

    def final_sparsities(self, scores: Mapping[str, Tensor]) -> dict[str, float]:
        """Per-layer sparsities of the final mask (the allocation at ``sparsity``)."""
        return self._layer_sparsities(self.sparsity, scores=scores)

    def _final_masks(self) -> dict[str, Tensor]:
        scores = self.final_scores()
        sp = self.final_sparsities(scores)
        fixed = self.pattern.fixed_sparsity
        return {n: self.pattern.mask(scores[n].to(self.params[n].device), fixed if fixed is not None else sp[n])
                for n in self.params}

    def _initial_masks(self, data: Batches | None) -> MaskSet:
        for n, p in self.params.items():
            self.pattern.check_shape(p.shape, n)
        return MaskSet({n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()},
                       {n: self.pattern for n in self.params})

    def before_harden(self) -> None:
        """Called right before the mask is chosen (remove gates, restore weights ...)."""

    def harden(self) -> None:
        """Choose the exact mask now and enforce it from here on."""
        if self.hardened:
            return
        self.before_harden()
        with torch.no_grad():
            for n, m in self._final_masks().items():
                self._set_mask(n, m)
        self.hardened = True

    def _update(self, step: int) -> bool:
        if not self.hardened and step >= self.harden_at:
            self.harden()
            return True
        return False

    def _extra_state(self) -> dict[str, Any]:
        return {"hardened": self.hardened}

    def _load_extra_state(self, extra: Mapping[str, Any]) -> None:
        self.hardened = bool(extra.get("hardened", False))
