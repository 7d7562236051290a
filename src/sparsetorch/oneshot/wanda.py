"""Wanda (Sun et al., ICLR 2024): score ``|W_ij| · ||X_j||_2``, compared inside each output row.

Unstructured sparsity uses the per-output-row comparison group of the reference (every row
loses exactly ``floor(s · C_in)`` weights); N:M keeps the N best of every M inputs. No update.
"""

from __future__ import annotations

from torch import Tensor

from ..patterns import NM, Pattern, RowWise, Unstructured
from ..scores import wanda as wanda_score
from .base import Solver
from .stats import InputStats


def wanda_scores(weight: Tensor, input_norm: Tensor) -> Tensor:
    return wanda_score(weight, input_norm=input_norm)


def wanda_mask(weight: Tensor, input_norm: Tensor, sparsity: float, pattern: Pattern) -> Tensor:
    """Keep-mask: per output row for unstructured (Wanda's group), N:M groups, else ``pattern``."""
    sc = wanda_scores(weight, input_norm)
    if isinstance(pattern, Unstructured):
        pattern = RowWise()
    return pattern.mask(sc, None if isinstance(pattern, NM) else sparsity)


class Wanda(Solver):
    name = "wanda"
    needs = frozenset({"sq"})

    def solve(
        self,
        weight: Tensor,
        stats: InputStats | None,
        sparsity: float,
        pattern: Pattern,
        *,
        name: str = "",
    ):
        assert stats is not None
        return weight, wanda_mask(weight, stats.input_norm(), sparsity, pattern)
