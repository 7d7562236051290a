"""AC/DC (Peste et al., 2021): alternating compressed / decompressed training.

Dense warm-up for ``warmup`` steps, then phases of ``phase`` steps alternate, starting with a
compressed (sparse) phase: magnitude top-k masks at the target sparsity, then a decompressed
(dense) phase where all masks are open and the pruned weights restart from zero. The last
``final`` steps are one long compressed phase, so training ends sparse. Defaults follow the
paper's ImageNet recipe scaled to ``total_steps``: warm-up 10%, phases 5%, final 15%.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ScheduleError
from ..masks import MaskSet
from ..patterns import n_pruned, topk_mask
from .base import Batches, Sparsifier, register_method, require_total_steps


@register_method("acdc")
class ACDC(Sparsifier):
    """Alternating compressed/decompressed training; masks are magnitude top-k at each compressed phase."""

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        allocation: str = "uniform",
        warmup: int | None = None,
        phase: int | None = None,
        final: int | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(sparsity, allocation=allocation, **kw)
        if warmup is None or phase is None or final is None:
            total = require_total_steps(self, "its phases")
            warmup = int(0.10 * total) if warmup is None else warmup
            phase = max(1, int(0.05 * total)) if phase is None else phase
            final = int(0.15 * total) if final is None else final
        if warmup < 0 or phase < 1 or final < 0:
            raise ScheduleError(f"acdc needs warmup >= 0, phase >= 1, final >= 0; got {warmup}, {phase}, {final}.")
        self.warmup, self.phase, self.final = int(warmup), int(phase), int(final)
        if self.total_steps is not None and self.warmup + self.final > self.total_steps:
            raise ScheduleError(
                f"acdc warmup ({self.warmup}) + final ({self.final}) exceed total_steps ({self.total_steps})."
            )

    def compressed(self, step: int) -> bool:
        """Whether the steps after optimizer step ``step`` train with sparse masks."""
        if step < self.warmup:
            return False
        if self.total_steps is not None and step >= self.total_steps - self.final:
            return True
        return ((step - self.warmup) // self.phase) % 2 == 0

    def _magnitude(self) -> dict[str, torch.Tensor]:
        scores = {n: p.detach().abs().float() for n, p in self.params.items()}
        sp = self._layer_sparsities(self.sparsity, scores=scores)
        return {
            n: topk_mask(s.reshape(-1), s.numel() - n_pruned(sp[n], s.numel())).reshape(s.shape)
            for n, s in scores.items()
        }

    def _initial_masks(self, data: Batches | None) -> MaskSet:
        if self.compressed(0):
            return MaskSet(self._magnitude())
        return MaskSet({n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()})

    def _update(self, step: int) -> bool:
        now, before = self.compressed(step), self.compressed(step - 1)
        if now == before:
            return False
        new = self._magnitude() if now else {n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()}
        for n, m in new.items():
            self._set_mask(n, m)
        return True
