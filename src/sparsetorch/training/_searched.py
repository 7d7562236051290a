"""A method whose per-layer sparsities come from a search, then any registered method trains.

``attach`` runs the search on copies of the model (the caller's model is untouched until the
inner method attaches), builds ``inner`` (default ``"rigl"``, options ``inner_args``) with ``allocation=`` the searched
``{name: sparsity}`` and hands everything on to it; ``step``, ``state_dict`` and ``detach`` go to
the inner method. The searched allocation and the search's record are kept in ``searched`` and
``search_info``. On resume the search runs again (it is deterministic for the same seed and data).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import MethodError
from ..masks import MaskSet
from ..targets import select
from .base import Batches, Sparsifier, get_method


class SearchedAllocation(Sparsifier):
    """Search an allocation in ``attach``, then train with ``inner`` (a method name) at that allocation."""

    needs_data: ClassVar[bool] = True

    def __init__(self, sparsity: float = 0.9, *, inner: str = "rigl", inner_args: Mapping[str, Any] | None = None,
                 allocation: str = "erk", **kw: Any) -> None:
        super().__init__(sparsity, allocation=allocation, **kw)
        key = str(inner).lower().replace("-", "_")
        if key in ("dass", "random_search"):
            raise MethodError(f"{self.name}: the inner method must train with the allocation, not search again; got {inner!r}.")
        if inner_args is not None and not isinstance(inner_args, Mapping):
            raise MethodError(f"{self.name}: inner_args must be a mapping of options, got {inner_args!r}.")
        self.method = key
        self.method_args = dict(inner_args or {})
        get_method(self.method, sparsity=self.sparsity, allocation="erk", total_steps=self.total_steps or 1,
                   **self.method_args)  # validate the name and options now
        self.inner: Sparsifier | None = None
        self.searched: dict[str, float] | None = None
        self.search_info: dict[str, Any] = {}

    def search(self, model: nn.Module, params: Mapping[str, torch.Tensor], data: Batches) -> tuple[dict[str, float], dict[str, Any]]:
        raise NotImplementedError

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
               data: Batches | None = None) -> MaskSet:
        if self.model is not None:
            raise MethodError(f"{self.name} is already attached to a model; call detach() first.")
        if data is None:
            raise MethodError(f"{self.name} searches on training data: pass attach(model, optimizer, data=batches).")
        params = select(model, self.targets, self.ignore)
        self.searched, self.search_info = self.search(model, params, data)
        kw = {"sparsity": self.sparsity, "allocation": self.searched, "targets": self.targets, "ignore": self.ignore,
              "seed": self.seed, "total_steps": self.total_steps, **self.method_args}
        self.inner = get_method(self.method, **{k: v for k, v in kw.items() if v is not None})
        self.inner.average = self.average
        for reset in self._state_resets:  # registered before attach: the inner method changes the masks
            self.inner.on_mask_change(reset)
        self.masks = self.inner.attach(model, optimizer, data=data)
        self.model, self.optimizer, self.params = model, optimizer, self.inner.params
        self.history = self.inner.history
        return self.masks

    def on_mask_change(self, reset: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        super().on_mask_change(reset)
        if self.inner is not None:
            self.inner.on_mask_change(reset)

    def step(self) -> bool:
        self._check_attached()
        assert self.inner is not None
        self.step_count += 1
        changed = self.inner.step()
        self.masks = self.inner.masks
        return changed

    def needs_dense_grad(self) -> bool:
        return self.inner.needs_dense_grad() if self.inner is not None else False

    def detach(self) -> MaskSet:
        self._check_attached()
        assert self.inner is not None
        masks = self.inner.detach()
        self.model = self.optimizer = None
        return masks

    def state_dict(self) -> dict[str, Any]:
        self._check_attached()
        assert self.inner is not None
        st = self.inner.state_dict()
        return {**st, "method": self.name, "step": self.step_count,
                "extra": {"inner_method": self.inner.name, "inner_extra": st.get("extra", {}),
                          "allocation": dict(self.searched or {})}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._check_attached()
        assert self.inner is not None
        if state.get("method", self.name) != self.name:
            raise MethodError(f"state was saved by method {state.get('method')!r}, not {self.name!r}.")
        extra = dict(state.get("extra", {}))
        inner_state = {**state, "method": self.inner.name, "extra": extra.get("inner_extra", {})}
        self.inner.load_state_dict(inner_state)
        self.step_count = int(state["step"])
        self.masks = self.inner.masks
