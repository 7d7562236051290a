"""Build (once) and load the compiled CPU kernels.

The extension is compiled with ``torch.utils.cpp_extension.load_inline`` the first time it is
needed and cached under ``$SPARSETORCH_CACHE_DIR`` (default ``~/.cache/sparsetorch``) in a
folder keyed by the source, the torch version and the CPU, so later imports load it in
milliseconds. If there is no compiler, or the build fails, :func:`get_extension` returns
``None`` after one warning and the callers fall back to dense (or scipy) kernels.
Set ``SPARSETORCH_NO_COMPILE=1`` to skip the build entirely.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from ._csrc import FUNCTIONS, SOURCE

__all__ = ["get_extension", "extension_error", "cache_dir", "reset"]

_lock = threading.Lock()
_state: dict[str, object] = {"loaded": False, "module": None, "error": None}


def cache_dir() -> Path:
    """Folder holding compiled kernels (``$SPARSETORCH_CACHE_DIR`` or ``~/.cache/sparsetorch``)."""
    env = os.environ.get("SPARSETORCH_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "sparsetorch"


def _cpu_key() -> str:
    """CPU flags string: the build uses -march=native, so a cache is only valid on one CPU type."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "model name")):
                    flags += line
                if line.startswith("flags"):
                    break
    except OSError:
        pass
    return platform.machine() + platform.processor() + flags


def _compile(prefix: str, source: str, functions: list[str] | None) -> ModuleType:
    """Compile ``source`` with ``load_inline`` (or load its cached build). Raises on any failure.

    The module is named ``{prefix}_{key}`` and built under ``cache_dir()/kernels/`` in a folder of
    that name, ``key`` hashing the source, torch, the CPU (``-march=native``) and Python, so a
    changed source or another machine never loads a stale build. ``functions=None`` when the
    source has its own ``PYBIND11_MODULE``.
    """
    import torch
    from torch.utils.cpp_extension import load_inline

    key = hashlib.sha256(
        (source + torch.__version__ + _cpu_key() + platform.python_version()).encode()
    ).hexdigest()[:12]
    name = f"{prefix}_{key}"
    build_dir = cache_dir() / "kernels" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    return load_inline(
        name=name,
        cpp_sources=[source],
        functions=functions,
        extra_cflags=["-O3", "-fopenmp", "-march=native", "-std=c++17"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        verbose=False,
    )


def _load_once(
    state: dict[str, object],
    lock: threading.Lock,
    build: Callable[[], ModuleType],
    describe: Callable[[Exception], str],
    on_failure: Callable[[Exception], None] | None = None,
) -> ModuleType | None:
    """Build an extension at most once per process (double-checked under ``lock``).

    ``state`` holds ``loaded``, ``module`` and ``error``. With ``SPARSETORCH_NO_COMPILE`` set (to
    anything but ``0``) nothing is built and the error says so; a failing ``build()`` (compiler
    missing, build error, import error ...) leaves ``module`` None with ``describe(exc)`` as the
    error, after ``on_failure(exc)`` (e.g. one warning). Later calls return the cached result.
    """
    if state["loaded"]:
        return state["module"]  # type: ignore[return-value]
    with lock:
        if state["loaded"]:
            return state["module"]  # type: ignore[return-value]
        module = None
        if os.environ.get("SPARSETORCH_NO_COMPILE", "") not in ("", "0"):
            state["error"] = "disabled by SPARSETORCH_NO_COMPILE"
        else:
            try:
                module = build()
            except Exception as exc:  # compiler missing, build error, import error ...
                state["error"] = describe(exc)
                if on_failure is not None:
                    on_failure(exc)
        state["module"] = module
        state["loaded"] = True
        return module


def _build() -> ModuleType:
    """Compile (or load the cached build of) the extension. Raises on any failure."""
    return _compile("sparsetorch_kernels", SOURCE, FUNCTIONS)


def _warn_failed(exc: Exception) -> None:
    warnings.warn(
        "sparsetorch could not build its compiled sparse CPU kernels "
        f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
        "falling back to dense / scipy kernels. Install a C++ compiler (g++) "
        "to get sparse speedups.",
        RuntimeWarning,
        stacklevel=4,
    )


def get_extension() -> ModuleType | None:
    """The compiled kernel module, or ``None`` (with one warning) if it cannot be built."""
    # _build is looked up at call time: tests replace it to simulate a failed build
    return _load_once(_state, _lock, lambda: _build(), lambda exc: f"{type(exc).__name__}: {exc}", _warn_failed)


def extension_error() -> str | None:
    """Why the extension is unavailable (None if it loaded or was not tried yet)."""
    return _state["error"]  # type: ignore[return-value]


def reset() -> None:
    """Forget the loaded extension (tests use this to simulate a failed build)."""
    with _lock:
        _state.update(loaded=False, module=None, error=None)
