"""sparsetorch: sparse neural networks across their whole life, in PyTorch.

A sparse model is a dense model plus a :class:`MaskSet`; every method chooses or changes masks.
Heavy entry points (``prune``, ``evaluate``, ``save``/``load``) are imported lazily so that
``import sparsetorch`` stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from . import allocation, errors, patterns, schedules, scores, targets
from .errors import (
    CheckpointError,
    DependencyError,
    MaskError,
    PatternError,
    SparseTorchError,
    SparsityValueError,
    TargetError,
)
from .masks import MaskSet
from .patterns import parse_pattern
from .prune import PruneReport, prune
from .targets import select

__version__ = "0.1.0"

_LAZY = {
    "evaluate": ("sparsetorch.evaluate", None),
    "save": ("sparsetorch.export", "save"),
    "load": ("sparsetorch.export", "load"),
    "sparsify_for_inference": ("sparsetorch.inference", "sparsify_for_inference"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        mod, attr = _LAZY[name]
        m = import_module(mod)
        return m if attr is None else getattr(m, attr)
    raise AttributeError(f"module 'sparsetorch' has no attribute {name!r}")


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
    *_LAZY,
]
