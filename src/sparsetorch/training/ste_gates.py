"""Straight-through top-k gates: learned scores choose an exact mask while the weights train.

Each targeted weight gets a score tensor ``s`` (initialised to ``|W| / mean|W|``); the forward
uses ``W * M`` with ``M = pattern.mask(s, s_t)`` exact at every step (any pattern of
:mod:`sparsetorch.patterns`, N:M included), and the backward passes ``dL/dW~ * W`` to the scores as
if the mask were the identity (straight-through). The sparsity ``s_t`` follows the cubic
schedule from 0 (dense) at ``start`` to the target at ``ramp_end`` (default 50% of the run; an N:M
pattern holds from the start). The scores train with their own Adam (``gate_lr``). At
``harden_at`` the mask is fixed from the scores and the gates are removed.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..errors import MethodError
from ..regularize.gates import TopKGate
from ..schedules import Cubic
from ._gated import GatedSparsifier
from .base import register_method


@register_method("ste_gates")
class STEGates(GatedSparsifier):
    """Straight-through top-k gates with a cubic sparsity ramp, then the exact mask.

    Args:
        ramp_end: step at which the target sparsity is reached (default 50% of ``total_steps``).
        update_every: steps between mask refreshes from the scores (default 1).
        gate_lr: Adam learning rate of the scores.
    """

    def __init__(self, sparsity: float = 0.9, *, ramp_end: int | None = None, update_every: int = 1,
                 allocation: str = "erk", gate_lr: float = 0.05, **kw: Any) -> None:
        super().__init__(sparsity, allocation=allocation, gate_lr=gate_lr, **kw)
        if ramp_end is None:
            ramp_end = max(self.start + 1, int(0.5 * (self.total_steps or 2 * self.harden_at)))
        self.ramp_end = min(int(ramp_end), self.harden_at)
        if self.ramp_end <= self.start:
            raise MethodError(f"ste_gates: ramp_end ({ramp_end}) must be after start ({self.start}).")
        if int(update_every) < 1:
            raise MethodError(f"update_every must be >= 1, got {update_every}.")
        self.update_every = int(update_every)
        self.schedule = Cubic(0.0, self.sparsity, self.start, self.ramp_end, 1)
        self._sp: dict[str, float] = {}

    def target(self, step: int) -> float:
        """Global sparsity of the gates at ``step``."""
        return self.schedule(step)

    def _layer_targets(self, step: int) -> dict[str, float]:
        return self._layer_sparsities(self.target(step)) if self.target(step) > 0 else {n: 0.0 for n in self.params}

    def make_gate(self, name: str, weight: Tensor) -> nn.Module:
        if not self._sp:
            self._sp = self._layer_targets(0)
        return TopKGate(weight, self.pattern, self._sp[name])

    def after_gate_step(self) -> None:
        step = self.step_count + 1
        if step % self.update_every and step != self.ramp_end:
            return
        sp = self._layer_targets(step)
        for n, g in self.gates.items():
            g.refresh(sp[n])  # type: ignore[operator]

    def _load_extra_state(self, extra) -> None:  # noqa: ANN001
        super()._load_extra_state(extra)
        sp = self._layer_targets(self.step_count)
        for n, g in self.gates.items():
            g.refresh(sp[n])  # type: ignore[operator]

    def gate_scores(self) -> dict[str, Tensor]:
        return {n: g.scores.detach().float() for n, g in self.gates.items()}  # type: ignore[union-attr]
