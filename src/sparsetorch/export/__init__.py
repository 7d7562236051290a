"""Compressed sparse checkpoints: ``save`` / ``load`` in an engine-neutral safetensors format.

Formats (:class:`Format`): ``dense``, ``bitmask``, ``csr`` and packed ``n:m``; ``auto`` picks
the smallest per tensor. The layout is specified in ``docs/format.md``; the numpy-only
:mod:`sparsetorch.export.reader` reads it without torch.
"""

from __future__ import annotations

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
from .formats import FORMATS, Format, get_format
from .reader import FORMAT_VERSION, read, read_header

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
