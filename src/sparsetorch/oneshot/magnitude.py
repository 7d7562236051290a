"""Magnitude solver: keep the largest ``|W|`` (layer-wise threshold, or N:M groups). No update."""

from __future__ import annotations

from torch import Tensor

from ..patterns import Pattern
from .base import Solver
from .stats import InputStats


def magnitude_mask(weight: Tensor, sparsity: float, pattern: Pattern) -> Tensor:
    """Keep-mask of ``|W|`` under ``pattern`` (unstructured = one threshold per matrix)."""
    return pattern.mask(weight.abs(), None if pattern.fixed_sparsity is not None else sparsity)


class Magnitude(Solver):
    name = "magnitude"

    def solve(
        self,
        weight: Tensor,
        stats: InputStats | None,
        sparsity: float,
        pattern: Pattern,
        *,
        name: str = "",
    ):
        return weight, magnitude_mask(weight, sparsity, pattern)
