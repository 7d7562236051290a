"""Shared machinery of dynamic sparse training (SET, RigL): drop by magnitude, grow by a score.

Every ``update_every`` steps in ``[start, end]`` each layer drops ``k = floor(f_t * nnz)`` of its
active weights with the smallest magnitude and grows ``k`` inactive positions with the largest
growth score (just-dropped positions are eligible). Per-layer counts never change, so the
sparsity stays exactly the allocated one. New weights start at zero and their optimizer state
is reset; a connection dropped and regrown in the same update keeps its value and state.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..errors import MethodError
from ..masks import _whole
from ..patterns import n_pruned, topk_mask
from ..schedules import CosineDecay
from .base import Sparsifier, check_steps


class DynamicSparsifier(Sparsifier):
    """Base of drop/grow methods. ``decay`` is ``"cosine"`` (paper) or ``"constant"``.

    Args:
        update_every: steps between mask updates (ΔT, default 100).
        drop_fraction: fraction of active weights replaced at an update (α, default 0.3).
        start: first step at which updates may happen.
        end: last update step; default 75% of ``total_steps``.
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        update_every: int = 100,
        drop_fraction: float = 0.3,
        decay: str = "cosine",
        start: int = 0,
        end: int | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(sparsity, **kw)
        if int(update_every) < 1:
            raise MethodError(f"update_every must be a positive number of steps, got {update_every}.")
        if not (0.0 < float(drop_fraction) <= 1.0):
            raise MethodError(f"drop_fraction must be in (0, 1], got {drop_fraction}.")
        if decay not in ("cosine", "constant"):
            raise MethodError(f"decay must be 'cosine' or 'constant', got {decay!r}.")
        self.update_every = int(update_every)
        self.drop_fraction = float(drop_fraction)
        self.decay = decay
        self.start = int(start)
        if end is None:
            if self.total_steps is None:
                raise MethodError(
                    f"{self.name} needs total_steps (or end=...) to stop updating masks at 75% of "
                    "training; pass total_steps=len(loader) * epochs."
                )
            end = int(0.75 * self.total_steps)
        self.end = int(end)
        check_steps(self.start, self.end)
        self._cosine = CosineDecay(self.drop_fraction, self.end, self.start) if decay == "cosine" else None

    def is_update_step(self, step: int) -> bool:
        """True if masks change after optimizer step ``step`` (1-based count of optimizer steps)."""
        return self.start <= step <= self.end and step % self.update_every == 0

    def fraction(self, step: int) -> float:
        """Drop fraction at ``step``: ``α/2 (1 + cos(π t / end))`` or constant ``α``."""
        if self._cosine is not None:
            return self._cosine(step)
        return self.drop_fraction if self.start <= step <= self.end else 0.0

    def grow_scores(self, name: str, param: Tensor) -> Tensor:
        """Score of every position for growth (higher = grown first)."""
        raise NotImplementedError

    def _update(self, step: int) -> bool:
        if not self.is_update_step(step):
            return False
        f = self.fraction(step)
        assert self.masks is not None
        for name, p in self.params.items():
            # whole tensors (FSDP2 shards are gathered: a collective, on update steps only), so
            # every rank ranks the same numbers and a layer's top-k is over the whole layer
            old = _whole(self.masks[name])
            nnz = int(old.sum())
            k = n_pruned(f, nnz)  # floor(f * nnz), robust to float round-off (shared count rule)
            if k <= 0 or nnz == old.numel():
                continue
            drop_score = _whole(p.detach()).abs().float().masked_fill(~old, float("-inf"))
            kept = topk_mask(drop_score.reshape(-1), nnz - k).reshape(old.shape)
            g = _whole(self.grow_scores(name, p)).float().masked_fill(kept, float("-inf"))
            grow = topk_mask(g.reshape(-1), k).reshape(old.shape)
            self._set_mask(name, kept | grow)
        self._after_update()
        return True

    def _after_update(self) -> None:
        pass
