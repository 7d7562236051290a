"""SNFS / sparse momentum (Dettmers & Zettlemoyer, 2019): momentum-based redistribution and growth.

Every ``update_every`` steps (the reference updates once per epoch):

1. per layer, the mean |momentum| over active weights, normalised over layers -> share ``v_l``;
2. each layer drops ``ceil(p * nnz_l)`` of its smallest-magnitude active weights;
3. the total dropped count is regrown across layers in proportion to ``v_l`` (capped by each
   layer's free positions, the rest redistributed), so the *overall* sparsity stays exact
   while per-layer sparsities move;
4. each layer grows at the free positions with the largest |momentum| (just-dropped ones eligible).

``p`` starts at ``prune_rate`` (0.5) and decays by a cosine to ``prune_rate_min`` (0.005).
The momentum is an exponential average (decay ``beta``=0.9) of the *dense* gradients kept by a
gradient hook (as in the RigL repository's sparse-momentum baseline), so it works with any optimizer
even though ``MaskSet`` masks ``.grad``. Simplification: the reference's adjustment for layers
below 20% sparsity is not implemented. Optimizer state of grown weights is reset.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import MethodError
from ..patterns import topk_mask
from .base import Sparsifier, check_steps, register_method


def redistribute(shares: Mapping[str, float], total: int, capacity: Mapping[str, int]) -> dict[str, int]:
    """Split ``total`` integers across layers in proportion to ``shares``, each at most ``capacity``.

    Exact: the result sums to ``total`` (``total`` must not exceed the summed capacity).
    """
    if total > sum(capacity.values()):
        raise MethodError(f"cannot regrow {total} weights into {sum(capacity.values())} free positions.")
    alloc = {n: 0 for n in shares}
    remaining = total
    active = [n for n in shares if capacity[n] > 0]
    for _ in range(100000):
        if remaining <= 0 or not active:
            break
        w = {n: max(float(shares[n]), 0.0) for n in active}
        tw = sum(w.values())
        if tw <= 0:
            w = {n: 1.0 for n in active}
            tw = float(len(active))
        add = {n: int(math.floor(remaining * w[n] / tw)) for n in active}
        if sum(add.values()) == 0:
            best = max(active, key=lambda n: (w[n], -list(shares).index(n)))
            add = {n: 0 for n in active}
            add[best] = 1
        for n in list(active):
            a = min(add[n], capacity[n] - alloc[n])
            alloc[n] += a
            remaining -= a
            if alloc[n] >= capacity[n]:
                active.remove(n)
    return alloc


@register_method("snfs")
class SNFS(Sparsifier):
    """Sparse momentum: magnitude drop, momentum growth, momentum-based redistribution across layers."""

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        allocation: str = "uniform",
        update_every: int = 100,
        prune_rate: float = 0.5,
        prune_rate_min: float = 0.005,
        beta: float = 0.9,
        end: int | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(sparsity, allocation=allocation, **kw)
        if int(update_every) < 1:
            raise MethodError(f"update_every must be a positive number of steps, got {update_every}.")
        if not (0.0 < prune_rate <= 1.0) or not (0.0 <= prune_rate_min <= prune_rate):
            raise MethodError(f"need 0 <= prune_rate_min <= prune_rate <= 1, got {prune_rate_min}, {prune_rate}.")
        self.update_every = int(update_every)
        self.prune_rate = float(prune_rate)
        self.prune_rate_min = float(prune_rate_min)
        self.beta = float(beta)
        if end is None:
            if self.total_steps is None:
                raise MethodError("snfs needs total_steps (or end=...) for its prune-rate decay.")
            end = self.total_steps
        self.end = int(end)
        check_steps(0, self.end)
        self.momentum: dict[str, Tensor] = {}

    def rate(self, step: int) -> float:
        """Prune rate at ``step``: cosine from ``prune_rate`` to ``prune_rate_min`` over ``end`` steps."""
        t = min(max(step, 0), self.end)
        return self.prune_rate_min + (self.prune_rate - self.prune_rate_min) * 0.5 * (1 + math.cos(math.pi * t / self.end))

    def is_update_step(self, step: int) -> bool:
        return 0 < step <= self.end and step % self.update_every == 0

    def _install_hooks(self) -> None:
        self.momentum = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        b = self.beta
        for name, p in self.params.items():
            if not p.requires_grad:
                continue

            def hook(grad: Tensor, _name: str = name) -> None:
                self.momentum[_name].mul_(b).add_(grad.detach().float(), alpha=1.0 - b)

            self._handles.append(p.register_hook(hook))

    def _update(self, step: int) -> bool:
        if not self.is_update_step(step):
            return False
        assert self.masks is not None
        p_rate = self.rate(step)
        # the momentum is linear in the gradients, so averaging it over workers here equals the
        # momentum of the averaged gradients (identity on one process)
        momentum = {n: self.average(self.momentum[n]) for n in self.params}
        kept, removed, cap, share = {}, {}, {}, {}
        for n, p in self.params.items():
            m = self.masks[n]
            nnz = int(m.sum())
            mom = momentum[n].abs()
            share[n] = float(mom[m].mean()) if nnz else 0.0
            k = min(int(math.ceil(p_rate * nnz - 1e-9)), nnz)
            drop = p.detach().abs().float().masked_fill(~m, float("-inf"))
            kept[n] = topk_mask(drop.reshape(-1), nnz - k).reshape(m.shape)
            removed[n] = k
            cap[n] = m.numel() - (nnz - k)
        ts = sum(share.values())
        share = {n: (v / ts if ts > 0 else 1.0) for n, v in share.items()}
        grow = redistribute(share, sum(removed.values()), cap)
        for n in self.params:
            sc = momentum[n].abs().masked_fill(kept[n], float("-inf"))
            g = topk_mask(sc.reshape(-1), grow[n]).reshape(sc.shape)
            self._set_mask(n, kept[n] | g)
        return True

    def _extra_state(self) -> dict[str, Any]:
        return {"momentum": {n: t.cpu().clone() for n, t in self.momentum.items()}}

    def _load_extra_state(self, extra: Mapping[str, Any]) -> None:
        for n, t in extra.get("momentum", {}).items():
            if n in self.momentum:
                self.momentum[n].copy_(t)
