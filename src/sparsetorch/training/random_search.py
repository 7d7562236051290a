"""``random_search``: random per-layer sparsities with short proxy training, then train with ``inner``.

See :func:`sparsetorch.regularize.random_search` ("Random Search as a Baseline for Sparse NAS"):
``trials`` candidates around the base allocation (candidate 0 = the base itself), each trained
for ``proxy_steps`` with a fixed random mask and scored on held-out training batches; the best
``{name: sparsity}`` goes to ``inner`` (default RigL). The search costs ``trials * proxy_steps``
training steps on top of the run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..regularize.search import random_search
from ._searched import SearchedAllocation
from .base import Batches, register_method


@register_method("random_search")
class RandomSearch(SearchedAllocation):
    """Random search over per-layer sparsities, then ``inner`` (default ``"rigl"``) with the best.

    Args:
        trials: candidates (the base allocation is the first).
        proxy_steps: SGD steps of each candidate's proxy training.
        val_batches: training batches held out to score the candidates.
        spread: standard deviation of the per-layer logit perturbation.
    """

    def __init__(self, sparsity: float = 0.9, *, trials: int = 8, proxy_steps: int = 100, val_batches: int = 4,
                 spread: float = 1.0, search_lr: float = 0.05, **kw: Any) -> None:
        super().__init__(sparsity, **kw)
        self.trials, self.proxy_steps, self.val_batches = int(trials), int(proxy_steps), int(val_batches)
        self.spread, self.search_lr = float(spread), float(search_lr)

    def search(self, model: nn.Module, params: Mapping[str, torch.Tensor], data: Batches):  # noqa: ANN201
        return random_search(model, params, data, self.sparsity, trials=self.trials, proxy_steps=self.proxy_steps,
                             val_batches=self.val_batches, spread=self.spread, lr=self.search_lr,
                             base=self.allocation, seed=self.seed)
