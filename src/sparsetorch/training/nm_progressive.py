"""Progressive N:M (structure-decay gradient flow, Bambhaniya et al. 2024; ALGORITHMS.md E.3).

Binary masks whose N:M pattern tightens from dense (or a looser N:M) to the target:

* ``mode="sparsify"``: ``(M-1):M -> M/2:M -> M/4:M -> ... -> N:M``;
* ``mode="fine"``: ``8N:8M -> 4N:4M -> 2N:2M -> N:M`` (a stage is skipped for a layer whose
  input dimension it does not divide).

``dense_steps`` of dense warm-up come first, the target holds for the last ``finetune_steps``,
and the stages split the steps in between equally. Training inside each stage is STE (or
SR-STE with ``decay`` > 0).
"""

from __future__ import annotations

from typing import Any

from ..errors import MethodError
from ..patterns import NM, Pattern
from ._nm import NMSparsifier
from .base import register_method


def stages(n: int, m: int, mode: str = "sparsify") -> list[tuple[int, int]]:
    """The sequence of (N, M) patterns ending at the target ``n:m``."""
    if mode == "sparsify":
        out = [(m - 1, m)] if m - 1 > n else []
        k = m // 2
        while k > n:
            if (k, m) not in out:
                out.append((k, m))
            k //= 2
        out.append((n, m))
        return out
    if mode == "fine":
        return [(8 * n, 8 * m), (4 * n, 4 * m), (2 * n, 2 * m), (n, m)]
    raise MethodError(f"nm_progressive mode must be 'sparsify' or 'fine', got {mode!r}.")


@register_method("nm_progressive")
class NMProgressive(NMSparsifier):
    """Gradual N:M: dense warm-up, then progressively tighter N:M stages, then the target."""

    def __init__(
        self,
        pattern: str | NM = "2:4",
        *,
        mode: str = "sparsify",
        dense_steps: int = 0,
        finetune_steps: int | None = None,
        decay: float = 0.0,
        **kw: Any,
    ) -> None:
        super().__init__(pattern, decay=decay, **kw)
        self._set_phases(dense_steps, finetune_steps, "its N:M stages")
        self.mode = mode
        self.stages = stages(self.pattern.n, self.pattern.m, mode)

    def stage_index(self, step: int) -> int:
        """-1 during the dense warm-up, else the index into :attr:`stages`."""
        if step < self.dense_steps:
            return -1
        k = (step - self.dense_steps) * len(self.stages) // self.span
        return min(k, len(self.stages) - 1)

    def pattern_at(self, name: str, step: int) -> Pattern | None:
        k = self.stage_index(step)
        if k < 0:
            return None
        p = self.params[name]
        for n, m in self.stages[k:]:
            pat = NM(n, m)
            if self._fits(p, pat):
                return pat
        return self.pattern
