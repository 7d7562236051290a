"""Build (once) and load the decode engine and low-bit kernels (:mod:`._decode_csrc`).

Compiled like :mod:`._ext` and by the same helpers (:func:`._ext._compile`, cached under
``$SPARSETORCH_CACHE_DIR`` in a folder keyed by the source, torch, Python and the CPU;
:func:`._ext._load_once`, built at most once per process). :func:`get_decode_extension` returns
``None`` when it cannot be built (no compiler, ``SPARSETORCH_NO_COMPILE=1``); callers then fall
back (the decode path to Hugging Face ``generate``, the kernels to dense) and say why.
"""

from __future__ import annotations

import threading
from types import ModuleType

from ._decode_csrc import SOURCE
from ._ext import _compile, _load_once

__all__ = ["get_decode_extension", "decode_extension_error", "reset"]

_lock = threading.Lock()
_state: dict[str, object] = {"loaded": False, "module": None, "error": None}


def _build() -> ModuleType:
    """Compile (or load the cached build of) the decode extension. Raises on any failure."""
    return _compile("sparsetorch_decode", SOURCE, None)


def _describe(exc: Exception) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"


def get_decode_extension() -> ModuleType | None:
    """The compiled decode module, or ``None`` if it cannot be built (see :func:`decode_extension_error`)."""
    # _build is looked up at call time, so a test can replace it to simulate a failed build
    return _load_once(_state, _lock, lambda: _build(), _describe)


def decode_extension_error() -> str | None:
    """Why the decode extension is unavailable (None if it loaded or was not tried yet)."""
    return _state["error"]  # type: ignore[return-value]


def reset() -> None:
    """Forget the loaded extension (tests use this to simulate a failed build)."""
    with _lock:
        _state.update(loaded=False, module=None, error=None)
