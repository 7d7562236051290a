"""Hooking a penalty into any ``torch.optim`` optimizer the supported way (step hooks).

* gradient terms (HyperSparse, the L0 gates' penalty) are added to ``.grad`` in an optimizer
  **step pre-hook**, so gradient accumulation counts them once per optimizer step;
* proximal steps (L1, group lasso, the k-level envelope) run in an optimizer **step post-hook**,
  with the step ``t = lr * lambda`` taken from the learning rate of the parameter's group at that
  moment (a scheduler's current value).

Nothing patches ``optimizer.step``; :func:`lr_of` works for every optimizer with ``lr`` in its
param groups (all of ``torch.optim``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import MethodError

__all__ = ["lr_of", "add_pre_step", "add_post_step"]


def lr_of(optimizer: torch.optim.Optimizer, param: Tensor) -> float:
    """The current learning rate of the param group holding ``param``."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p is param:
                lr = group.get("lr")
                if isinstance(lr, Tensor):
                    lr = float(lr)
                if lr is None:
                    raise MethodError("the optimizer's param group has no 'lr'; proximal steps need a learning rate.")
                return float(lr)
    raise MethodError(
        "a regularised parameter is not in the optimizer: build the optimizer over model.parameters() "
        "before attach()."
    )


def add_pre_step(optimizer: torch.optim.Optimizer, fn: Callable[[], None]) -> torch.utils.hooks.RemovableHandle:
    """Run ``fn()`` (under ``no_grad``) before every ``optimizer.step()``."""

    def hook(_opt: torch.optim.Optimizer, _a: object, _k: object) -> None:
        with torch.no_grad():
            fn()

    return optimizer.register_step_pre_hook(hook)


def add_post_step(optimizer: torch.optim.Optimizer, fn: Callable[[], None]) -> torch.utils.hooks.RemovableHandle:
    """Run ``fn()`` (under ``no_grad``) after every ``optimizer.step()``."""

    def hook(_opt: torch.optim.Optimizer, _a: object, _k: object) -> None:
        with torch.no_grad():
            fn()

    return optimizer.register_step_post_hook(hook)
