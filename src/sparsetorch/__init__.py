"""sparsetorch: sparse neural networks across their whole life, in PyTorch.

A sparse model is a dense model plus a :class:`MaskSet`; every method chooses or changes masks.
Only the typed errors are imported eagerly: every torch-using member (``MaskSet``, ``prune``,
``save``/``load``, the core modules ...) is imported on first use (module ``__getattr__``), so
``import sparsetorch`` stays fast and the numpy-only reader
(``import sparsetorch.export.reader``) loads no torch.
"""

from __future__ import annotations

import sys
import types
from importlib import import_module
from typing import TYPE_CHECKING, Any

from . import errors
from .errors import (
    CheckpointError,
    DependencyError,
    MaskError,
    PatternError,
    SparseTorchError,
    SparsityValueError,
    TargetError,
)

__version__ = "0.1.0"

#: public name -> (module, attribute or None for the module itself), imported on first access
_LAZY: dict[str, tuple[str, str | None]] = {
    "allocation": ("sparsetorch.allocation", None),
    "patterns": ("sparsetorch.patterns", None),
    "schedules": ("sparsetorch.schedules", None),
    "scores": ("sparsetorch.scores", None),
    "targets": ("sparsetorch.targets", None),
    "MaskSet": ("sparsetorch.masks", "MaskSet"),
    "parse_pattern": ("sparsetorch.patterns", "parse_pattern"),
    "select": ("sparsetorch.targets", "select"),
    "prune": ("sparsetorch.prune", "prune"),
    "PruneReport": ("sparsetorch.prune", "PruneReport"),
    "evaluate": ("sparsetorch.evaluate", None),
    "save": ("sparsetorch.export", "save"),
    "load": ("sparsetorch.export", "load"),
    "sparsify_for_inference": ("sparsetorch.inference", "sparsify_for_inference"),
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from . import allocation, evaluate, patterns, schedules, scores, targets
    from .export import load, save
    from .inference import sparsify_for_inference
    from .masks import MaskSet
    from .patterns import parse_pattern
    from .prune import PruneReport, prune
    from .targets import select


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        mod, attr = _LAZY[name]
        m = import_module(mod)
        value = m if attr is None else getattr(m, attr)
    elif not name.startswith("_"):
        # any other submodule (sparsetorch.oneshot, sparsetorch.training ...), as attribute access
        # found it when the eager imports above had loaded it
        try:
            value = import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'sparsetorch' has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module 'sparsetorch' has no attribute {name!r}")
    globals()[name] = value  # cache: the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


#: public functions that share their name with the submodule defining them
_SHADOWED = {"prune": "prune"}


class _Package(types.ModuleType):
    """The package's module class. When a submodule such as ``sparsetorch.prune`` is imported (by
    anyone, at any time), the import system binds it as a package attribute; here the function of
    the same name is bound instead, so ``sparsetorch.prune(...)`` always calls the function (the
    eager ``from .prune import prune`` used to guarantee that)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            value = getattr(value, _SHADOWED[name], value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "MaskSet",
    "parse_pattern",
    "select",
    "allocation",
    "errors",
    "patterns",
    "schedules",
    "scores",
    "targets",
    "CheckpointError",
    "DependencyError",
    "MaskError",
    "PatternError",
    "SparsityValueError",
    "SparseTorchError",
    "TargetError",
    "prune",
    "PruneReport",
    "evaluate",
    "save",
    "load",
    "sparsify_for_inference",
]
