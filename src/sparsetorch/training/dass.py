"""``dass``: a differentiable per-layer sparsity search (DASS-style), then train with ``inner``.

See :func:`sparsetorch.regularize.dass_search`: per-layer density logits under the exact global
budget, trained jointly with soft magnitude masks on a copy of the model for ``search_steps``
batches of the training data; the resulting ``{name: sparsity}`` is handed to ``inner``
(default RigL). The search's cost (``search_steps`` forward/backward passes) comes on top of the run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..regularize.search import dass_search
from ._searched import SearchedAllocation
from .base import Batches, register_method


@register_method("dass")
class DASS(SearchedAllocation):
    """Differentiable allocation search, then ``inner`` (default ``"rigl"``) with that allocation.

    Args:
        search_steps: proxy training steps of the search.
        search_lr, alpha_lr: SGD learning rate of the weight copy; Adam learning rate of the logits.
        inner, inner_args: the training method that uses the allocation, and its options.
    """

    def __init__(self, sparsity: float = 0.9, *, search_steps: int = 200, search_lr: float = 0.05,
                 alpha_lr: float = 0.05, **kw: Any) -> None:
        super().__init__(sparsity, **kw)
        self.search_steps, self.search_lr, self.alpha_lr = int(search_steps), float(search_lr), float(alpha_lr)

    def search(self, model: nn.Module, params: Mapping[str, torch.Tensor], data: Batches):  # noqa: ANN201
        return dass_search(model, params, data, self.sparsity, steps=self.search_steps, lr=self.search_lr,
                           alpha_lr=self.alpha_lr, base=self.allocation, seed=self.seed)
