"""Shared N:M training machinery (STE / SR-STE, ALGORITHMS.md E.2).

Dense weights ``W`` are kept in a shadow copy owned by the Sparsifier; the model's parameter
always holds ``W * M`` with ``M`` the top-N of every M consecutive ``|W|`` along the input
dimension, so the model is N:M sparse at every moment (evaluation, export, ``MaskSet.verify``).
The forward therefore uses ``W~ = W * M`` and the gradient ``dL/dW~`` reaches every position
(straight-through: ``.grad`` is not masked). After ``optimizer.step()`` the update the optimizer
applied to the parameter is added to the dense shadow, ``W <- W * (1 - M) + param``, the mask
is recomputed from ``|W|`` and the parameter is set to ``W * M_new``. Any optimizer works.

SR-STE adds ``lambda_w * (1 - M) * W`` to the gradient (once per optimizer step, in an
optimizer step pre-hook, so gradient accumulation counts it once).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MethodError, PatternError, TargetError
from ..masks import MaskSet
from ..patterns import NM, Pattern, Unstructured, parse_pattern
from .base import Batches, Sparsifier, require_total_steps


class NMSparsifier(Sparsifier):
    """N:M training with dense shadow weights; ``decay`` > 0 gives SR-STE.

    Layers whose input dimension is not a multiple of M are skipped when ``targets`` is not
    given (they are listed in ``skipped``); with explicit ``targets`` they raise PatternError.
    """

    def __init__(self, pattern: str | NM = "2:4", *, decay: float = 0.0, **kw: Any) -> None:
        pat = parse_pattern(pattern)
        if not isinstance(pat, NM):
            raise PatternError(f"N:M training needs an 'N:M' pattern such as '2:4', got {pattern!r}.")
        kw.pop("sparsity", None)
        kw.setdefault("allocation", "uniform")
        super().__init__(pat.fixed_sparsity, **kw)
        if decay < 0:
            raise MethodError(f"decay (lambda_w) must be >= 0, got {decay}.")
        self.pattern: NM = pat
        self.decay = float(decay)
        self.dense_weights: dict[str, Tensor] = {}
        self.skipped: list[str] = []

    def _set_phases(self, dense_steps: int, finetune_steps: int | None, what: str) -> None:
        """Dense warm-up, a schedule span, then ``finetune_steps`` at the target (default 25% of the
        run); sets ``dense_steps``, ``finetune_steps`` and ``span`` (shared by the progressive methods)."""
        total = require_total_steps(self, what)
        self.dense_steps = int(dense_steps)
        self.finetune_steps = int(0.25 * total) if finetune_steps is None else int(finetune_steps)
        self.span = total - self.dense_steps - self.finetune_steps
        if self.dense_steps < 0 or self.finetune_steps < 0 or self.span < 1:
            raise MethodError(
                f"{self.name}: dense_steps ({self.dense_steps}) + finetune_steps ({self.finetune_steps}) "
                f"must leave room inside total_steps ({total})."
            )

    # ---- which layers
    def _fits(self, p: Tensor, pat: Pattern) -> bool:
        try:
            pat.check_shape(p.shape)
            return True
        except PatternError:
            return False

    def _filter_params(self, params: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
        out = {}
        for n, p in params.items():
            if self._fits(p, self.pattern):
                out[n] = p
            elif self.targets is not None:
                self.pattern.check_shape(p.shape, n)
            else:
                self.skipped.append(n)
        if not out:
            raise TargetError(f"no targeted layer has an input dimension divisible by {self.pattern.m}.")
        return out

    # ---- pattern over time (overridden by the progressive schedule)
    def pattern_at(self, name: str, step: int) -> Pattern | None:
        """The pattern that governs the steps after ``step`` for layer ``name`` (None = dense)."""
        return self.pattern

    def _mask_for(self, name: str, w: Tensor, pat: Pattern | None) -> Tensor:
        if pat is None:
            return torch.ones_like(w, dtype=torch.bool)
        return pat.mask(w.abs(), None)

    # ---- lifecycle hooks
    def _initial_masks(self, data: Batches | None) -> MaskSet:
        masks, pats = {}, {}
        for n, p in self.params.items():
            self.dense_weights[n] = p.detach().clone()
            pat = self.pattern_at(n, 0)
            masks[n] = self._mask_for(n, p.detach(), pat)
            pats[n] = pat if pat is not None else Unstructured()
        return MaskSet(masks, pats)

    def _enforce(self) -> None:
        # no gradient masking (straight-through); the parameter holds W * M
        assert self.masks is not None and self.model is not None
        self.masks.apply(self.model)

    def _install_hooks(self) -> None:
        if self.decay <= 0:
            return
        if self.optimizer is None:
            raise MethodError("SR-STE adds its decay term to the gradient before optimizer.step(): pass the optimizer to attach().")

        def pre_step(_opt: torch.optim.Optimizer, _a: object, _k: object) -> None:
            assert self.masks is not None
            with torch.no_grad():
                for n, p in self.params.items():
                    if p.grad is not None:
                        pruned = ~self.masks[n]
                        p.grad.add_(self.dense_weights[n] * pruned, alpha=self.decay)

        self._handles.append(self.optimizer.register_step_pre_hook(pre_step))

    def _update(self, step: int) -> bool:
        assert self.masks is not None
        changed = False
        for n, p in self.params.items():
            old = self.masks[n]
            w = self.dense_weights[n]
            w.mul_(~old).add_(p.detach())  # kept: param value; pruned: shadow + optimizer update
            pat = self.pattern_at(n, step)
            new = self._mask_for(n, w, pat)
            new_pat = pat if pat is not None else Unstructured()
            if self.masks.patterns[n] != new_pat:
                self.masks.patterns[n] = new_pat
                changed = True
            p.copy_(w * new)
            if not changed and not torch.equal(new, old):
                changed = True
            self.masks.set(n, new)
        return changed

    def _record(self) -> None:
        # only record when per-layer sparsity moves (N:M flips keep the counts)
        if self.masks is None:
            return
        cur = dict(self.masks.sparsity().per_layer)
        if not self.history or self.history[-1][1] != cur:
            self.history.append((self.step_count, cur))

    def _extra_state(self) -> dict[str, Any]:
        return {"dense_weights": {n: w.cpu().clone() for n, w in self.dense_weights.items()}}

    def _load_extra_state(self, extra: Mapping[str, Any]) -> None:
        for n, w in extra.get("dense_weights", {}).items():
            if n in self.dense_weights:
                self.dense_weights[n].copy_(w)
        for n in self.params:
            pat = self.pattern_at(n, self.step_count)
            assert self.masks is not None
            self.masks.patterns[n] = pat if pat is not None else Unstructured()

    def _on_detach(self) -> None:
        self.dense_weights = {}
