"""GraSP (Wang et al., 2020): prune at init preserving gradient flow, ``S = -W * (H g)`` (ALGORITHMS.md C.2)."""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DataError
from ..masks import MaskSet
from .base import Batches, Sparsifier, _unpack, register_method


@register_method("grasp")
class GraSP(Sparsifier):
    """Remove the weights with the largest ``-W * Hg`` (global by default), logits divided by ``temperature``.

    ``g`` is the gradient summed over ``num_batches`` batches (stopped); for each batch
    ``Hg = d/dW (g_stop . dL/dW)``. The model is left unchanged.
    """

    needs_data = True

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        allocation: str = "global",
        num_batches: int = 2,
        temperature: float = 200.0,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(sparsity, allocation=allocation, **kw)
        self.num_batches = int(num_batches)
        self.temperature = float(temperature)
        self.loss_fn = loss_fn or F.cross_entropy

    def scores(self, data: Batches) -> dict[str, Tensor]:
        """Keep-scores ``W * Hg`` (higher = keep, i.e. the negated GraSP score)."""
        assert self.model is not None
        names = list(self.params)
        ps = [self.params[n] for n in names]
        batches = list(islice(data, self.num_batches))
        if not batches:
            raise DataError("the data iterable passed to attach() yielded no batches.")
        T = self.temperature
        with torch.enable_grad():
            g = [torch.zeros_like(p) for p in ps]
            for b in batches:
                x, y = _unpack(b)
                gs = torch.autograd.grad(self.loss_fn(self.model(x) / T, y), ps, allow_unused=True)
                for acc, gi in zip(g, gs):
                    if gi is not None:
                        acc += gi.detach()
            hg = [torch.zeros_like(p) for p in ps]
            for b in batches:
                x, y = _unpack(b)
                gs = torch.autograd.grad(self.loss_fn(self.model(x) / T, y), ps, create_graph=True, allow_unused=True)
                z = sum((gi * gst).sum() for gi, gst in zip(gs, g) if gi is not None)
                hgs = torch.autograd.grad(z, ps, allow_unused=True)
                for acc, h in zip(hg, hgs):
                    if h is not None:
                        acc += h.detach()
        # GraSP removes the largest S = -W*Hg, so the keep-score is -S = W*Hg
        return {n: (p.detach() * h).float() for n, p, h in zip(names, ps, hg)}

    def _initial_masks(self, data: Batches | None) -> MaskSet:
        assert data is not None
        return self._masks_from_scores(self.scores(data), self.sparsity)
