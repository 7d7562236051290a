"""The k-level group envelope (Refael, Arbel, Huleihel, arXiv 2212.12921; ALGORITHMS.md J.2).

Each targeted weight keeps ``k_l`` groups, ``k_l = G_l - floor(s_l G_l)`` from the allocated
per-layer sparsity ``s_l``; the penalty ``P_k(W) = S_k(W) - 1/2 ||W||^2`` (zero exactly when at most
``k`` groups are non-zero; see :mod:`sparsetorch.regularize.prox`) is applied with its exact
proximal operator after every ``optimizer.step()`` (a step post-hook). The prox step
``t = lr * lambda`` grows geometrically from ``lr * lam`` at ``start`` to 1 at ``harden_at``: at
``t >= 1`` the prox keeps exactly the ``k`` largest groups, so the sparsity fixed in advance is
reached when the penalty phase ends (then the mask is fixed and the run fine-tunes).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..errors import MethodError
from ..patterns import n_pruned
from ..regularize.prox import check_k, kgroup_prox
from .base import register_method
from .group_lasso import GroupSparsifier


@register_method("kgroup")
class KGroup(GroupSparsifier):
    """Proximal training with the k-level group envelope; ``k`` per layer from the allocation.

    Args:
        groups: the group kind (``"element"``, ``"row"``, ``"in_channel"``, ``"N:M"``, ``"blockHxW"``).
        lam: the initial penalty strength (prox step ``lr * lam``); it ramps to ``t = 1`` at ``harden_at``.
        k: groups kept per layer, overriding the allocation (an int for every layer).
    """

    def __init__(self, sparsity: float = 0.9, *, k: int | None = None, **kw: Any) -> None:
        super().__init__(sparsity, **kw)
        if k is not None and (isinstance(k, bool) or int(k) != k or k < 1):
            raise MethodError(f"k (groups kept per layer) must be a positive integer, got {k!r}.")
        self.k_fixed = None if k is None else int(k)
        self.k: dict[str, int] = {}

    def _install_hooks(self) -> None:
        shapes = {n: p.detach() for n, p in self.params.items()}
        sp = self._layer_sparsities(self.sparsity, scores={n: s.abs() for n, s in shapes.items()})
        for n, p in self.params.items():
            g = self.grouping.n_groups(p.shape)
            k = self.k_fixed if self.k_fixed is not None else g - n_pruned(sp[n], g)
            self.k[n] = check_k(k, g, n)
        super()._install_hooks()

    def step_size(self, lr: float, step: int) -> float:
        """``t`` at ``step``: geometric from ``lr * lam`` (at ``start``) to 1 (at ``harden_at``)."""
        t0 = min(max(lr * self.lam, 1e-12), 1.0)
        frac = min(max((step - self.start) / max(self.harden_at - self.start, 1), 0.0), 1.0)
        return t0 ** (1.0 - frac)

    def prox_groups(self, name: str, groups: Tensor, lr: float, step: int) -> Tensor:
        return kgroup_prox(groups, self.k[name], self.step_size(lr, step))

    def final_sparsities(self, scores):  # noqa: ANN001, ANN202
        out = {}
        for n, p in self.params.items():
            g = self.grouping.n_groups(p.shape)
            out[n] = (g - self.k[n]) / g
        return out
