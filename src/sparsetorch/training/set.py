"""SET (Mocanu et al., 2018): drop the smallest-magnitude weights, regrow at random (ALGORITHMS.md D.1)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._dst import DynamicSparsifier
from .base import register_method


@register_method("set")
class SET(DynamicSparsifier):
    """Sparse Evolutionary Training: magnitude drop, uniform random growth, new weights at zero."""

    def grow_scores(self, name: str, param: Tensor) -> Tensor:
        return torch.rand(param.shape, generator=self.generator).to(param.device)
