"""Shared machinery of the gate methods (``ste_gates``, ``l0``): parametrizations on the targeted
weights while the gates learn, their own optimizer (Adam, stepped in a post-step hook of the
model's optimizer, so the model's optimizer may be any ``torch.optim`` one), and removal of the
parametrizations when the exact mask is chosen.

While the gates are attached, ``model.named_parameters()`` lists a targeted weight as
``<module>.parametrizations.weight.original`` (the same Parameter object the model's optimizer
holds) and the gate's own tensors beside it; after ``harden`` the model has its plain names again.
The model's *state dict* keeps the plain names throughout: while the gates are on it holds each
targeted weight under ``<module>.weight`` (its ungated value) and no gate tensors (those are part
of the sparsifier's own state), and ``load_state_dict`` accepts the plain names back. So a
checkpoint written mid-gate-phase (a Hugging Face ``Trainer`` checkpoint, ``save_pretrained``)
loads into the plain model, and a resumed run puts the gates back from the sparsifier state.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import MethodError
from ..masks import MaskSet
from ..regularize.penalty import add_post_step
from ._learned import LearnedSparsifier


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = name.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), attr


class GatedSparsifier(LearnedSparsifier):
    """Gates as parametrizations until ``harden_at``; subclasses build one gate per weight."""

    def __init__(self, sparsity: float = 0.9, *, gate_lr: float = 0.01, **kw: Any) -> None:
        super().__init__(sparsity, **kw)
        if not gate_lr > 0:
            raise MethodError(f"gate_lr must be > 0, got {gate_lr}.")
        self.gate_lr = float(gate_lr)
        self.gates: dict[str, nn.Module] = {}
        self.gate_optimizer: torch.optim.Optimizer | None = None

    def make_gate(self, name: str, weight: Tensor) -> nn.Module:
        raise NotImplementedError

    def gate_parameters(self) -> list[nn.Parameter]:
        return [p for g in self.gates.values() for p in g.parameters()]

    def before_gate_step(self) -> None:
        """Add penalty gradients to the gates' ``.grad`` (called before the gates' optimizer step)."""

    def after_gate_step(self) -> None:
        """Refresh masks, move schedules (called after the gates' optimizer step)."""

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
               data: Any = None) -> MaskSet:
        """Attach as every method (all-open masks enforced by name), then put the gates on the weights."""
        masks = super().attach(model, optimizer, data=data)
        for n, p in self.params.items():
            mod, attr = _owner(model, n)
            gate = self.make_gate(n, p)
            parametrize.register_parametrization(mod, attr, gate)
            self.gates[n] = gate
        self.gate_optimizer = torch.optim.Adam(self.gate_parameters(), lr=self.gate_lr)
        def plain(*a: Any) -> None:  # a function: torch tags the hook, a bound method cannot be tagged
            self._plain_state_dict(*a)

        self._sd_handles = [
            model.register_state_dict_post_hook(plain),
            model.register_load_state_dict_pre_hook(self._gated_load_state_dict),
        ]
        return masks

    def _gated_keys(self, prefix: str) -> list[tuple[str, str, str, str]]:
        """(weight name, plain key, parametrized key, gate-tensor key prefix) of every gated weight."""
        out = []
        for n in self.gates:
            mod, _, attr = n.rpartition(".")
            base = f"{prefix}{mod}." if mod else prefix
            out.append((n, f"{base}{attr}", f"{base}parametrizations.{attr}.original",
                        f"{base}parametrizations.{attr}.0."))
        return out

    def _plain_state_dict(self, module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
        """State-dict post-hook: plain weight names (ungated values), no gate tensors."""
        keys = self._gated_keys(prefix)
        rename = {orig: plain for _, plain, orig, _ in keys}
        gate_prefixes = tuple(g for *_, g in keys)
        items = [(rename.get(k, k), v) for k, v in state_dict.items() if not k.startswith(gate_prefixes)]
        state_dict.clear()
        state_dict.update(items)

    def _gated_load_state_dict(self, module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        """Load pre-hook: plain weight names go to the parametrization's ``original``; gate tensors
        the state dict does not hold keep their current values (they load with the sparsifier)."""
        for n, plain, orig, gate_prefix in self._gated_keys(prefix):
            if plain in state_dict and orig not in state_dict:
                state_dict[orig] = state_dict.pop(plain)
                for k, v in self.gates[n].state_dict().items():
                    state_dict.setdefault(gate_prefix + k, v)

    def _install_hooks(self) -> None:
        if self.optimizer is None:
            raise MethodError(f"{self.name} steps its gates after optimizer.step(): pass the optimizer to attach().")

        def post() -> None:
            if self.hardened or self.gate_optimizer is None:
                return
            self.before_gate_step()
            self.gate_optimizer.step()
            self.gate_optimizer.zero_grad(set_to_none=True)
            self.after_gate_step()

        self._handles.append(add_post_step(self.optimizer, post))

    def _enforce(self) -> None:
        # by Parameter objects, not names: while the gates are on, the names are the parametrized ones
        assert self.masks is not None
        self.masks.enforce(self.params, self.optimizer)  # type: ignore[arg-type]  # a {name: Parameter} mapping works

    def remove_gates(self) -> None:
        """Remove every parametrization; the weights keep their (ungated) values."""
        assert self.model is not None
        for h in getattr(self, "_sd_handles", []):
            h.remove()
        self._sd_handles = []
        for n in list(self.gates):
            mod, attr = _owner(self.model, n)
            if parametrize.is_parametrized(mod, attr):
                parametrize.remove_parametrizations(mod, attr, leave_parametrized=False)
        self.gates = {}
        self.gate_optimizer = None

    def before_harden(self) -> None:
        self._frozen_scores = {n: s.detach().clone() for n, s in self.gate_scores().items()}
        self.remove_gates()

    def gate_scores(self) -> dict[str, Tensor]:
        """Per-weight scores of the gates (higher = keep)."""
        raise NotImplementedError

    def final_scores(self) -> dict[str, Tensor]:
        scores = getattr(self, "_frozen_scores", None)
        return dict(scores) if scores is not None else self.gate_scores()

    def _on_detach(self) -> None:
        if self.gates:
            self.remove_gates()

    def _extra_state(self) -> dict[str, Any]:
        st = super()._extra_state()
        st["gates"] = {n: {k: v.detach().cpu().clone() for k, v in g.state_dict().items()} for n, g in self.gates.items()}
        if self.gate_optimizer is not None:
            st["gate_optimizer"] = copy.deepcopy(self.gate_optimizer.state_dict())  # a snapshot, not live tensors
        return st

    def _load_extra_state(self, extra: Mapping[str, Any]) -> None:
        was_hardened = self.hardened
        super()._load_extra_state(extra)
        if self.hardened and not was_hardened and self.gates:
            self.remove_gates()
        for n, sd in dict(extra.get("gates", {})).items():
            if n in self.gates:
                self.gates[n].load_state_dict(sd, strict=False)
        if self.gate_optimizer is not None and extra.get("gate_optimizer") is not None:
            self.gate_optimizer.load_state_dict(extra["gate_optimizer"])
        for g in self.gates.values():
            if hasattr(g, "refresh"):
                g.refresh()  # type: ignore[operator]
