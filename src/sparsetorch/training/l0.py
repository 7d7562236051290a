"""Hard-concrete L0 gates (Louizos, Welling, Kingma, ICLR 2018) ending in an exact mask.

One gate per group (``pattern="channel"`` gates whole output rows, a block pattern whole tiles,
otherwise one gate per weight); the model computes ``W * z`` with ``z`` sampled from the
hard-concrete distribution in training and deterministic at evaluation
(:class:`sparsetorch.regularize.HardConcreteGate`). The penalty ``lam * E[L0]`` (counted in weights) is added
to the gates' gradient before their own Adam step; ``lam`` is steered so that the expected
density tracks the target: it grows multiplicatively (``lam *= 1 + control`` per step) while the
density stays on one side of the target, and at each crossing it *restarts* on the other side
(``+lam`` initial value when the density rises above the target, ``-lam`` — a push that reopens
the most nearly open gates — when it falls below) and the gates' Adam momentum is dropped. This is
the dual restart of Gallego-Posada et al. ("Controlled Sparsity via Constrained Optimization",
NeurIPS 2022), made two-sided because the temperature annealing keeps lowering the open
probability of every gate. Without it the penalty grown on the way down keeps closing gates long
after the target is met, and a hard-concrete gate driven far below zero gets no task gradient to
reopen: on Fashion-MNIST at a 5% density target the expected density fell to ~1.2% before the mask
was chosen (``restart=False`` keeps that one-sided controller, for comparison). The temperature
``beta`` anneals geometrically from ``beta`` to ``beta_end`` over the gate phase. At ``harden_at`` the mask keeps the gates with the
largest ``log_alpha`` at the allocated sparsity (``"global"`` by default: one ranking over all
layers, so the per-layer sparsity is learned) in the requested pattern, exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MethodError
from ..patterns import Block, Channel
from ..regularize.gates import HardConcreteGate, expected_l0, expected_l0_grad
from ..regularize.groups import Grouping
from ..regularize.prox import check_lambda
from ._gated import GatedSparsifier
from .base import register_method


@register_method("l0")
class L0Gates(GatedSparsifier):
    """Hard-concrete L0 gates with a steered penalty and an annealed temperature.

    Args:
        lam: initial penalty strength (>= 0): each weight's gate is pushed by ``lam * dP(open)/dlog_alpha``.
        control: multiplicative step of the lambda controller per optimizer step (0 = fixed lambda).
        beta, beta_end: temperature at the start and at ``harden_at``.
        init_keep: initial open probability of the gates.
        restart: two-sided dual restart at each crossing of the target (see the module doc);
            ``False``: the one-sided controller (``lam`` divided by ``1 + control`` per step below
            the target; overshoots, kept for comparison).
    """

    def __init__(self, sparsity: float = 0.9, *, lam: float = 1e-5, control: float = 0.02, beta: float = 2 / 3,
                 beta_end: float = 0.1, init_keep: float = 0.9, allocation: str = "global", gate_lr: float = 0.05,
                 restart: bool = True, **kw: Any) -> None:
        super().__init__(sparsity, allocation=allocation, gate_lr=gate_lr, **kw)
        self.lam = check_lambda(lam, "lam")
        self.control = check_lambda(control, "control")
        self.lam0, self.restart = self.lam, bool(restart)
        self._above = True  # expected density above the target after the last gate step
        if not (beta > 0 and beta_end > 0):
            raise MethodError(f"beta and beta_end (temperatures) must be > 0, got {beta}, {beta_end}.")
        if not (0 < init_keep < 1):
            raise MethodError(f"init_keep must be in (0, 1), got {init_keep}.")
        self.beta0, self.beta_end, self.init_keep = float(beta), float(beta_end), float(init_keep)
        if isinstance(self.pattern, Channel):
            self.grouping = Grouping("row")
        elif isinstance(self.pattern, Block):
            self.grouping = Grouping("block", h=self.pattern.h, w=self.pattern.w)
        else:
            self.grouping = Grouping("element")
        self.density_history: list[float] = []

    def beta_at(self, step: int) -> float:
        frac = min(max((step - self.start) / max(self.harden_at - self.start, 1), 0.0), 1.0)
        return self.beta0 * (self.beta_end / self.beta0) ** frac

    def make_gate(self, name: str, weight: Tensor) -> nn.Module:
        return HardConcreteGate(weight, self.grouping, init_keep=self.init_keep, beta=self.beta0,
                                generator=self.generator)

    def expected_density(self) -> float:
        """Mean probability that a gate is non-zero (weights-weighted over all targeted tensors)."""
        num = den = 0.0
        for n, g in self.gates.items():
            per = self.params[n].numel() / g.log_alpha.numel()  # type: ignore[union-attr]
            num += float(expected_l0(g.log_alpha.detach(), g.beta)) * per  # type: ignore[union-attr]
            den += self.params[n].numel()
        return num / max(den, 1.0)

    def before_gate_step(self) -> None:
        if not self.active():
            return
        for n, g in self.gates.items():
            la = g.log_alpha  # type: ignore[union-attr]
            per = self.params[n].numel() / la.numel()
            pen = expected_l0_grad(la.detach(), g.beta) * (self.lam * per)  # type: ignore[union-attr]
            if la.grad is None:
                la.grad = torch.zeros_like(la)
            la.grad.add_(pen)

    def after_gate_step(self) -> None:
        step = self.step_count + 1
        rho = self.expected_density()
        self.density_history.append(rho)
        above = rho > 1 - self.sparsity
        if self.control > 0 and self.active(step):
            if not self.restart:
                self.lam *= (1 + self.control) if above else 1 / (1 + self.control)
            elif above != self._above:  # crossing: restart on the other side, drop the momentum
                self.lam = self.lam0 if above else -self.lam0
                self._drop_gate_momentum()
            else:
                self.lam *= 1 + self.control
        self._above = above
        b = self.beta_at(step)
        for g in self.gates.values():
            g.beta = b  # type: ignore[assignment]

    def _drop_gate_momentum(self) -> None:
        if self.gate_optimizer is None:
            return
        for st in self.gate_optimizer.state.values():
            if "exp_avg" in st:
                st["exp_avg"].zero_()

    def gate_scores(self) -> dict[str, Tensor]:
        return {n: self.grouping.expand(g.log_alpha.detach().float(), self.params[n].shape)  # type: ignore[union-attr]
                for n, g in self.gates.items()}

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "lam": self.lam, "above": self._above}

    def _load_extra_state(self, extra) -> None:  # noqa: ANN001
        super()._load_extra_state(extra)
        self.lam = float(extra.get("lam", self.lam))
        self._above = bool(extra.get("above", self._above))
        b = self.beta_at(self.step_count)
        for g in self.gates.values():
            g.beta = b  # type: ignore[assignment]


