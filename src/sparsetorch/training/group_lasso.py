"""Group lasso (and L1, sparse group lasso) with proximal steps (ALGORITHMS.md J.1).

``Omega(W) = lambda * sum_g sqrt(|g|) ||W_g||_2 (+ mu ||W||_1)`` over the groups of every targeted
weight (:mod:`sparsetorch.regularize.groups`: ``element`` = L1, ``row``/``out_channel``,
``in_channel``, ``N:M`` groups, ``blockHxW``). After every ``optimizer.step()`` (a step post-hook,
any optimizer) each weight takes the proximal step with ``t = lr * lambda``: the block soft
threshold, which sets whole groups exactly to zero. At ``harden_at`` the exact mask keeps the
groups of largest norm at the allocated per-layer sparsity (channel / block / unstructured
pattern, following the groups), and the rest of the run fine-tunes with it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..patterns import Block, Channel, Pattern, Unstructured, n_pruned, topk_mask
from ..regularize.groups import Grouping, parse_grouping
from ..regularize.penalty import add_post_step, lr_of
from ..regularize.prox import check_lambda, group_soft_threshold, soft_threshold
from ._learned import LearnedSparsifier
from .base import register_method


def pattern_of(grouping: Grouping) -> Pattern:
    """The mask pattern whose shapes are unions of whole groups of ``grouping``."""
    if grouping.kind == "row":
        return Channel()
    if grouping.kind == "block":
        return Block(grouping.h, grouping.w)
    return Unstructured()


class GroupSparsifier(LearnedSparsifier):
    """Shared by group lasso and the k-level envelope: groups, a prox in a post-step hook, and a
    final mask made of whole groups chosen by group norm."""

    def __init__(self, sparsity: float = 0.9, *, groups: str | Grouping = "element", lam: float = 1e-4,
                 allocation: str = "uniform", include_bias: bool = True, **kw: Any) -> None:
        self.grouping = parse_grouping(groups)
        kw.setdefault("pattern", pattern_of(self.grouping))
        super().__init__(sparsity, allocation=allocation, **kw)
        self.lam = check_lambda(lam, "lam (lambda)")
        self.include_bias = bool(include_bias)
        #: row groups: the bias of each output belongs to its group (a removed channel keeps no bias)
        self.biases: dict[str, torch.nn.Parameter] = {}
        self._dead_rows: dict[str, Tensor] = {}

    def _filter_params(self, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
        for n, p in params.items():
            self.grouping.check(p.shape, n)
        return params

    def prox_groups(self, name: str, groups: Tensor, lr: float, step: int) -> Tensor:
        """The proximal step on a ``[G, S]`` group view (the bias appended as a column for row groups)."""
        raise NotImplementedError

    def _find_biases(self) -> None:
        assert self.model is not None
        if not (self.include_bias and self.grouping.kind == "row"):
            return
        for n, p in self.params.items():
            mod_name, _, _ = n.rpartition(".")
            mod = self.model.get_submodule(mod_name) if mod_name else self.model
            b = getattr(mod, "bias", None)
            if isinstance(b, torch.nn.Parameter) and b.shape == (p.shape[0],):
                self.biases[n] = b

    def _install_hooks(self) -> None:
        if self.optimizer is None:
            from ..errors import MethodError

            raise MethodError(f"{self.name} takes proximal steps after optimizer.step(): pass the optimizer to attach().")
        opt = self.optimizer
        self._find_biases()

        def post() -> None:
            if self.hardened:
                for n, rows in self._dead_rows.items():
                    self.biases[n].masked_fill_(rows, 0)
                return
            step = self.step_count + 1
            if not self.active(step):
                return
            for n, p in self.params.items():
                g = self.grouping.to_groups(p.detach())
                b = self.biases.get(n)
                if b is not None:
                    g = torch.cat([g, b.detach().reshape(-1, 1).to(g.dtype)], dim=1)
                out = self.prox_groups(n, g, lr_of(opt, p), step)
                if b is not None:
                    b.copy_(out[:, -1])
                    out = out[:, :-1]
                p.copy_(self.grouping.from_groups(out.contiguous(), p.shape))

        self._handles.append(add_post_step(opt, post))

    def harden(self) -> None:
        super().harden()
        assert self.masks is not None
        for n, b in self.biases.items():
            m = self.masks[n]
            rows = ~m.reshape(m.shape[0], -1).any(1)
            self._dead_rows[n] = rows
            with torch.no_grad():
                b.masked_fill_(rows, 0)

    def final_scores(self) -> dict[str, Tensor]:
        return {n: self.grouping.expand(self.grouping.norms(p.detach()), p.shape) for n, p in self.params.items()}

    def _final_masks(self) -> dict[str, Tensor]:
        if self.grouping.kind in ("row", "block", "element"):
            return super()._final_masks()
        # N:M groups and input channels: keep whole groups by norm at the layer's sparsity
        sp = self.final_sparsities(self.final_scores())
        out = {}
        for n, p in self.params.items():
            norms = self.grouping.norms(p.detach())
            keep = norms.numel() - n_pruned(sp[n], norms.numel())
            gm = topk_mask(norms, keep)
            out[n] = self.grouping.expand(gm, p.shape).bool()
        return out

    def groups_zero(self) -> dict[str, int]:
        """Number of groups that are exactly zero in every targeted weight (what the prox removed)."""
        return {n: int((self.grouping.norms(p.detach()) == 0).sum()) for n, p in self.params.items()}


@register_method("group_lasso")
class GroupLasso(GroupSparsifier):
    """Proximal group lasso: ``lam * sum_g sqrt(|g|) ||W_g||`` (+ ``l1 * ||W||_1``: sparse group lasso).

    Args:
        groups: ``"element"`` (plain L1 when ``l1`` is 0), ``"row"``/``"out_channel"``, ``"in_channel"``,
            ``"N:M"`` (groups of M inputs), ``"blockHxW"``.
        lam: group penalty strength lambda (>= 0); the prox step is ``lr * lam``.
        l1: the L1 strength mu of the sparse group lasso (>= 0).
        include_bias: with row groups, each output's bias is part of its group, and a removed row's
            bias is kept at zero (so a removed channel outputs nothing and the layer can shrink).
    """

    def __init__(self, sparsity: float = 0.9, *, l1: float = 0.0, **kw: Any) -> None:
        super().__init__(sparsity, **kw)
        self.l1 = check_lambda(l1, "l1 (mu)")

    def prox_groups(self, name: str, groups: Tensor, lr: float, step: int) -> Tensor:
        g = soft_threshold(groups, lr * self.l1) if self.l1 > 0 else groups
        if self.grouping.kind == "element":
            return soft_threshold(g, lr * self.lam)
        return group_soft_threshold(g, lr * self.lam)
