"""Gradual magnitude pruning (Zhu & Gupta, 2017) on the cubic schedule (ALGORITHMS.md B.1).

``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t_end - t0)) ** 3``, applied every ``frequency``
steps between ``start`` and ``end``; each update re-masks every layer by the magnitude of its
*masked* weights, so pruned weights never come back.
"""

from __future__ import annotations

from typing import Any

import torch

from ..masks import MaskSet
from ..patterns import n_pruned, topk_mask
from ..schedules import Cubic
from .base import Batches, Sparsifier, register_method


@register_method("gmp")
class GMP(Sparsifier):
    """Gradual magnitude pruning from ``initial_sparsity`` to ``sparsity`` between ``start`` and ``end``.

    ``end`` defaults to 75% of ``total_steps``; ``allocation`` defaults to ``"uniform"`` (every
    layer follows the schedule); ``"erk"``/``"global"`` re-allocate at every update.
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        allocation: str = "uniform",
        initial_sparsity: float = 0.0,
        start: int = 0,
        end: int | None = None,
        frequency: int = 100,
        **kw: Any,
    ) -> None:
        super().__init__(sparsity, allocation=allocation, **kw)
        if end is None:
            from .base import require_total_steps

            end = int(0.75 * require_total_steps(self, "the end of pruning"))
        self.schedule = Cubic(initial_sparsity, self.sparsity, int(start), int(end), int(frequency))

    def target(self, step: int) -> float:
        """Global target sparsity at ``step`` (the cubic schedule)."""
        return self.schedule(step)

    def _magnitude_masks(self, sparsity: float, current: MaskSet | None) -> dict[str, torch.Tensor]:
        scores = {}
        for n, p in self.params.items():
            s = p.detach().abs().float()
            if current is not None:
                s = s.masked_fill(~current[n], -1.0)  # pruned stay pruned
            scores[n] = s
        sp = self._layer_sparsities(sparsity, scores=scores)
        return {
            n: topk_mask(sc.reshape(-1), sc.numel() - n_pruned(sp[n], sc.numel())).reshape(sc.shape)
            for n, sc in scores.items()
        }

    def _initial_masks(self, data: Batches | None) -> MaskSet:
        s0 = self.target(0)
        if s0 <= 0.0:
            return MaskSet({n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()})
        return MaskSet(self._magnitude_masks(s0, None))

    def _update(self, step: int) -> bool:
        if not self.schedule.is_update_step(step):
            return False
        assert self.masks is not None
        new = self._magnitude_masks(self.target(step), self.masks)
        for n, m in new.items():
            self._set_mask(n, m)
        return True
