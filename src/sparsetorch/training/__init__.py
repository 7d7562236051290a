"""Sparse training: methods that make a network sparse *while it trains*.

Every method is a :class:`Sparsifier` with the lifecycle ``attach(model, optimizer)`` ->
``step()`` after each ``optimizer.step()`` -> ``state_dict()``/``load_state_dict()`` -> ``detach()``.
Methods are registered by name in :data:`METHODS`; build one with :func:`get_method`.
"""

from __future__ import annotations

import importlib

from .base import METHODS, Sparsifier, get_method, register_method, reset_optimizer_state

_MODULES = (
    "static", "snip", "grasp", "synflow", "gmp", "imp", "set", "rigl", "snfs", "acdc",
    "ste", "srste", "nm_progressive", "nm_decay",
    # learned sparsity (sparsetorch.regularize)
    "hypersparse", "group_lasso", "kgroup", "l0", "ste_gates", "dass", "random_search",
)


def _load_all() -> None:
    """Import every built-in method module so that it registers itself."""
    for m in _MODULES:
        importlib.import_module(f"{__name__}.{m}")


_load_all()

__all__ = ["METHODS", "Sparsifier", "get_method", "register_method", "reset_optimizer_state"]
