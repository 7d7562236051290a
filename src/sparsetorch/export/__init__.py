"""Compressed sparse checkpoints: ``save`` / ``load`` in an engine-neutral safetensors format.

Formats (:class:`Format`): ``dense``, ``bitmask``, ``csr`` and packed ``n:m``; ``auto`` picks
the smallest per tensor. The layout is specified in ``docs/format.md``; the numpy-only
:mod:`sparsetorch.export.reader` reads it without torch. The torch side (``save``, ``load`` ...,
in :mod:`.checkpoint`) is imported on first use, so ``from sparsetorch.export import reader``
loads no torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .formats import FORMATS, Format, get_format
from .reader import FORMAT_VERSION, read, read_header

#: torch-using names, imported from .checkpoint on first access
_CHECKPOINT_NAMES = (
    "DEFAULT_FILENAME",
    "TensorSummary",
    "checkpoint_summary",
    "choose_format",
    "load",
    "load_hf",
    "load_state_dict",
    "save",
    "save_hf_folder",
)

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint import (
        DEFAULT_FILENAME,
        TensorSummary,
        checkpoint_summary,
        choose_format,
        load,
        load_hf,
        load_state_dict,
        save,
        save_hf_folder,
    )


def __getattr__(name: str) -> Any:
    if name in _CHECKPOINT_NAMES:
        value = getattr(import_module(f"{__name__}.checkpoint"), name)
        globals()[name] = value
        return value
    if name in ("checkpoint", "cli"):
        return import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'sparsetorch.export' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_CHECKPOINT_NAMES))


__all__ = [
    "DEFAULT_FILENAME",
    "FORMATS",
    "FORMAT_VERSION",
    "Format",
    "TensorSummary",
    "checkpoint_summary",
    "choose_format",
    "get_format",
    "load",
    "load_hf",
    "load_state_dict",
    "read",
    "read_header",
    "save",
    "save_hf_folder",
]
