"""Random pruning at initialisation ("static" sparse training, RigL's Static baseline).

A random mask with exact per-layer counts from the allocation (ER/ERK/uniform), fixed for the
whole run (ALGORITHMS.md C.4).
"""

from __future__ import annotations

from .base import Sparsifier, register_method


@register_method("random")
class RandomInit(Sparsifier):
    """Fixed random mask drawn at attach; ``allocation`` may be ``erk`` (default), ``er`` or ``uniform``."""


@register_method("static")
class Static(RandomInit):
    """Alias of :class:`RandomInit` (the name used in the RigL paper's tables)."""
