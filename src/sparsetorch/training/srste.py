"""SR-STE (Zhou et al., 2021): STE plus sparse-refined decay ``lambda_w (1 - M) W`` on pruned weights."""

from __future__ import annotations

from typing import Any

from ..patterns import NM
from ._nm import NMSparsifier
from .base import register_method


@register_method("srste")
class SRSTE(NMSparsifier):
    """N:M training with the SR-STE gradient ``dL/dW~ + lambda_w (1 - M) * W``; ``lambda_w = 2e-4`` by default."""

    def __init__(self, pattern: str | NM = "2:4", *, decay: float = 2e-4, **kw: Any) -> None:
        super().__init__(pattern, decay=decay, **kw)
