"""Build (once) and load the decode engine and low-bit kernels (:mod:`._decode_csrc`).

Compiled like :mod:`._ext` (``load_inline``, cached under ``$SPARSETORCH_CACHE_DIR`` in a folder
keyed by the source, torch, Python and the CPU). :func:`get_decode_extension` returns ``None``
when it cannot be built (no compiler, ``SPARSETORCH_NO_COMPILE=1``); callers then fall back
(the decode path to Hugging Face ``generate``, the kernels to dense) and say why.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
from pathlib import Path
from types import ModuleType

from ._decode_csrc import SOURCE
from ._ext import _cpu_key, cache_dir

__all__ = ["get_decode_extension", "decode_extension_error", "reset"]

_lock = threading.Lock()
_state: dict[str, object] = {"loaded": False, "module": None, "error": None}


def _build() -> ModuleType:
    import torch
    from torch.utils.cpp_extension import load_inline

    key = hashlib.sha256(
        (SOURCE + torch.__version__ + _cpu_key() + platform.python_version()).encode()
    ).hexdigest()[:12]
    name = f"sparsetorch_decode_{key}"
    build_dir: Path = cache_dir() / "kernels" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    return load_inline(
        name=name,
        cpp_sources=[SOURCE],
        functions=None,
        extra_cflags=["-O3", "-fopenmp", "-march=native", "-std=c++17"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        verbose=False,
    )


def get_decode_extension() -> ModuleType | None:
    """The compiled decode module, or ``None`` if it cannot be built (see :func:`decode_extension_error`)."""
    if _state["loaded"]:
        return _state["module"]  # type: ignore[return-value]
    with _lock:
        if _state["loaded"]:
            return _state["module"]  # type: ignore[return-value]
        module = None
        if os.environ.get("SPARSETORCH_NO_COMPILE", "") not in ("", "0"):
            _state["error"] = "disabled by SPARSETORCH_NO_COMPILE"
        else:
            try:
                module = _build()
            except Exception as exc:  # compiler missing, build error, import error ...
                first = str(exc).splitlines()[0] if str(exc) else ""
                _state["error"] = f"{type(exc).__name__}: {first}"
        _state["module"] = module
        _state["loaded"] = True
        return module


def decode_extension_error() -> str | None:
    """Why the decode extension is unavailable (None if it loaded or was not tried yet)."""
    return _state["error"]  # type: ignore[return-value]


def reset() -> None:
    """Forget the loaded extension (tests use this to simulate a failed build)."""
    with _lock:
        _state.update(loaded=False, module=None, error=None)
