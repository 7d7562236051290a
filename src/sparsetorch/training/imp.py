"""Iterative magnitude pruning / lottery tickets with rewinding (ALGORITHMS.md F).

A run is ``rounds + 1`` trainings. :meth:`IMP.attach` saves the weights at step 0; ``step()``
saves them again at ``rewind_step`` (k). After each training, :meth:`IMP.next_round` prunes
``ceil(rate * remaining)`` of the still-unpruned weights (global magnitude by default), then

* ``rewind="weights"`` (lottery ticket / weight rewinding): resets *all* model parameters and
  buffers to their values at step k (pruned ones to zero) and clears the optimizer state;
* ``rewind="lr"`` (learning-rate rewinding, Renda et al. 2020): keeps the trained weights.

In both cases the learning-rate schedule restarts at step k: pass ``scheduler=`` to have it
rewound, or restart your own schedule at the returned step. :meth:`IMP.run` drives it all from a
``train(start_step)`` callable.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from ..errors import MethodError
from ..masks import MaskSet
from ..patterns import topk_mask
from .base import Batches, Sparsifier, register_method


@register_method("imp")
class IMP(Sparsifier):
    """Lottery-ticket style iterative magnitude pruning with weight or learning-rate rewinding.

    Args:
        sparsity: final target; sets the number of rounds when ``rounds`` is None.
        rate: fraction of the remaining weights pruned per round (open_lth default 0.2).
        rounds: number of pruning rounds (default: enough to reach ``sparsity``).
        rewind_step: k, the step whose weights/schedule are rewound to (0 = original LTH).
        rewind: ``"weights"`` or ``"lr"``.
        scheduler: optional LR scheduler rewound to step k at every round.
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        allocation: str = "global",
        rate: float = 0.2,
        rounds: int | None = None,
        rewind_step: int = 0,
        rewind: str = "weights",
        scheduler: Any = None,
        **kw: Any,
    ) -> None:
        super().__init__(sparsity, allocation=allocation, **kw)
        if not (0.0 < rate < 1.0):
            raise MethodError(f"imp rate must be in (0, 1) (fraction pruned per round), got {rate}.")
        if rewind not in ("weights", "lr"):
            raise MethodError(f"imp rewind must be 'weights' or 'lr', got {rewind!r}.")
        if rewind_step < 0:
            raise MethodError(f"rewind_step must be >= 0, got {rewind_step}.")
        self.rate = float(rate)
        if rounds is None:
            rounds = max(1, math.ceil(math.log(1.0 - self.sparsity) / math.log(1.0 - self.rate))) if self.sparsity > 0 else 0
        self.rounds = int(rounds)
        self.rewind_step = int(rewind_step)
        self.rewind = rewind
        self.scheduler = scheduler
        self.round = 0
        self._rewind_state: dict[str, torch.Tensor] | None = None
        self._sched_state: dict[str, Any] | None = None
        self._initial_lrs: list[float] = []

    def _initial_masks(self, data: Batches | None) -> MaskSet:
        return MaskSet({n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()})

    def attach(self, model, optimizer=None, *, data=None) -> MaskSet:  # noqa: ANN001
        masks = super().attach(model, optimizer, data=data)
        if self.optimizer is not None:
            self._initial_lrs = [g.get("initial_lr", g["lr"]) for g in self.optimizer.param_groups]
        if self.scheduler is not None:
            self._sched_state = copy.deepcopy(self.scheduler.state_dict())
        if self.rewind_step == 0:
            self._save_rewind()
        return masks

    def _save_rewind(self) -> None:
        assert self.model is not None
        self._rewind_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _update(self, step: int) -> bool:
        if step == self.rewind_step and self.round == 0:
            self._save_rewind()
        return False

    def next_round(self) -> int:
        """Prune one round, rewind, and return the step k the training restarts from."""
        self._check_attached()
        assert self.masks is not None and self.model is not None
        if self._rewind_state is None:
            raise MethodError(
                f"imp never reached rewind_step={self.rewind_step}: train at least that many steps "
                "(calling step() after each optimizer.step()) before next_round()."
            )
        with torch.no_grad():
            remaining = sum(int(m.sum()) for m in self.masks.masks.values())
            n_prune = math.ceil(self.rate * remaining - 1e-9)
            names = list(self.params)
            scores = {n: self.params[n].detach().abs().float().masked_fill(~self.masks[n], -1.0) for n in names}
            if self.allocation == "global":
                flat = torch.cat([scores[n].reshape(-1).cpu() for n in names])
                keep = topk_mask(flat, remaining - n_prune)
                parts = torch.split(keep, [scores[n].numel() for n in names])
                new = {n: part.reshape(scores[n].shape) for n, part in zip(names, parts)}
            else:
                new = {}
                for n in names:
                    nnz = int(self.masks[n].sum())
                    k = math.ceil(self.rate * nnz - 1e-9)
                    new[n] = topk_mask(scores[n].reshape(-1), nnz - k).reshape(scores[n].shape)
            if self.rewind == "weights":
                self.model.load_state_dict(self._rewind_state)
            for n, m in new.items():
                self.masks.set(n, m.to(self.params[n].device))
            self.masks.apply(self.model)
            # state kept outside the optimizer (on_mask_change): gone where pruned, and everywhere
            # when every weight goes back to its rewind value
            for n, p in self.model.named_parameters() if self._state_resets else ():
                if self.rewind == "weights":
                    self._reset_registered(p, torch.ones_like(p, dtype=torch.bool))
                elif n in self.masks:
                    self._reset_registered(p, ~self.masks[n])
        if self.optimizer is not None:
            if self.rewind == "weights":
                self.optimizer.state.clear()
            for g, lr in zip(self.optimizer.param_groups, self._initial_lrs):
                g["lr"] = lr
        if self.scheduler is not None and self._sched_state is not None:
            self.scheduler.load_state_dict(copy.deepcopy(self._sched_state))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(self.rewind_step):
                    self.scheduler.step()
        self.round += 1
        self.step_count = self.rewind_step
        self._record()
        return self.rewind_step

    def run(self, train: Callable[[int], None]) -> list[float]:
        """Train, prune and rewind ``rounds`` times, then train the final ticket.

        ``train(start_step)`` must train the attached model from ``start_step`` to the end of the
        schedule, calling ``sparsifier.step()`` after each optimizer step. Returns the overall
        sparsity after each round.
        """
        out = []
        train(0)
        for _ in range(self.rounds):
            start = self.next_round()
            out.append(self.sparsity_actual())
            train(start)
        return out

    def _extra_state(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "rewind_state": None if self._rewind_state is None else {k: v.cpu() for k, v in self._rewind_state.items()},
        }

    def _load_extra_state(self, extra) -> None:  # noqa: ANN001
        self.round = int(extra.get("round", 0))
        rs = extra.get("rewind_state")
        if rs is not None:
            self._rewind_state = {k: v.clone() for k, v in rs.items()}
