"""SNIP (Lee et al., 2019): prune at init by connection sensitivity ``|g * W|`` (ALGORITHMS.md C.1)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..masks import MaskSet
from ..scores import snip as snip_score
from .base import Batches, Sparsifier, _unpack, register_method


def accumulated_grads(
    model: nn.Module,
    params: Mapping[str, Tensor],
    data: Batches,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    num_batches: int,
) -> dict[str, Tensor]:
    """Sum of ``dL/dW`` over the first ``num_batches`` batches; ``.grad`` of the model is untouched."""
    names = list(params)
    total = {n: torch.zeros_like(params[n]) for n in names}
    seen = 0
    for batch in islice(data, num_batches):
        x, y = _unpack(batch)
        loss = loss_fn(model(x), y)
        gs = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        for n, g in zip(names, gs):
            if g is not None:
                total[n] += g.detach()
        seen += 1
    if seen == 0:
        from ..errors import DataError

        raise DataError("the data iterable passed to attach() yielded no batches.")
    return total


@register_method("snip")
class SNIP(Sparsifier):
    """Keep the weights with the largest ``|dL/dW * W|`` on ``num_batches`` batches, fixed afterwards.

    ``allocation="global"`` (default, as in the paper) ranks all layers together; ``"erk"`` or
    ``"uniform"`` keep per-layer counts (RigL's SNIP variant).
    """

    needs_data = True

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        allocation: str = "global",
        num_batches: int = 1,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(sparsity, allocation=allocation, **kw)
        self.num_batches = int(num_batches)
        self.loss_fn = loss_fn or F.cross_entropy

    def scores(self, data: Batches) -> dict[str, Tensor]:
        """SNIP scores of the attached model's targeted weights (normalised to sum to 1)."""
        assert self.model is not None
        with torch.enable_grad():
            g = accumulated_grads(self.model, self.params, data, self.loss_fn, self.num_batches)
        sc = {n: snip_score(self.params[n], grad=g[n]).float() for n in self.params}
        total = sum(float(s.sum()) for s in sc.values()) or 1.0
        return {n: s / total for n, s in sc.items()}

    def _initial_masks(self, data: Batches | None) -> MaskSet:
        assert data is not None
        return self._masks_from_scores(self.scores(data), self.sparsity)
