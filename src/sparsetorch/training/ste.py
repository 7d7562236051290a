"""N:M training with the straight-through estimator (ALGORITHMS.md E.2): mask recomputed every step."""

from __future__ import annotations

from typing import Any

from ..patterns import NM
from ._nm import NMSparsifier
from .base import register_method


@register_method("ste")
class STE(NMSparsifier):
    """Dense weights, forward with the N:M-masked weights, gradient passed straight through to all weights."""

    def __init__(self, pattern: str | NM = "2:4", **kw: Any) -> None:
        kw.setdefault("decay", 0.0)
        super().__init__(pattern, **kw)
