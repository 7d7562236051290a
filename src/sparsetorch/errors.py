"""Typed errors. Every message says what went wrong *and* what to do about it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SparseTorchError(Exception):
    """Base class of every error sparsetorch raises on purpose."""


class SparsityValueError(SparseTorchError, ValueError):
    """A sparsity (fraction of zeros) outside [0, 1), or an inconsistent sparsity setting."""


class PatternError(SparseTorchError, ValueError):
    """A sparsity pattern that does not parse or does not fit a tensor's shape."""


class TargetError(SparseTorchError, ValueError):
    """Unknown parameter/module names, or a model with nothing to prune."""


class AllocationError(SparseTorchError, ValueError):
    """An allocation that cannot meet the requested global sparsity."""


class ScheduleError(SparseTorchError, ValueError):
    """A schedule with impossible steps (end before start, negative frequency ...)."""


class MaskError(SparseTorchError, ValueError):
    """A mask that does not match its parameter, or a violated sparsity invariant."""


class CheckpointError(SparseTorchError, OSError):
    """A checkpoint that is missing, truncated, corrupt or does not match the model."""


class OutputError(SparseTorchError, OSError):
    """An output path that cannot be written: its parent is a file, permission is denied, the
    file system is read-only. Raised before any work where the check can be made early."""


class OutputExistsError(OutputError, FileExistsError):
    """An output path holds files sparsetorch did not write (or is the input itself).

    Nothing is deleted or replaced without an explicit ``overwrite=True`` (``--overwrite``)."""


class OutputLockedError(OutputError):
    """Another process is writing the same output path; the message names it (pid, host)."""


class LimitError(SparseTorchError, ValueError):
    """A file or config asks for more memory than the caller-visible limit allows; checked before
    anything is allocated. The message names the limit argument to raise it."""


class DependencyError(SparseTorchError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""


class DataError(SparseTorchError, ValueError):
    """Missing or unusable data (empty calibration text, missing dataset files ...)."""


class MethodError(SparseTorchError, ValueError):
    """An unknown method name or invalid method configuration."""


class ModelError(SparseTorchError, ValueError):
    """A model the requested operation cannot handle (no decoder blocks, unknown model name ...)."""


class DistributedError(SparseTorchError, RuntimeError):
    """Ranks disagree (masks, settings) or a distributed setting is unusable."""


class PrivacyError(SparseTorchError, ValueError):
    """A DP-SGD setting that is invalid or would not be private (a mask computed from the private
    training data, epsilon <= 0, delta >= 1, clip <= 0, an unsupported trainable layer ...)."""


class DictionaryError(SparseTorchError, ValueError):
    """A sparse-dictionary setting or file that cannot be used (a site the model does not have,
    k >= width, a truncated activation shard, a harvest folder made with other settings ...)."""


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """Return a ' Did you mean: a, b?' suffix for an error message, or ''."""
    cands = list(candidates)
    found = difflib.get_close_matches(name, cands, n=n, cutoff=0.5)
    if not found:
        # fall back to substring matches, useful for long dotted parameter names
        found = [c for c in cands if name.split(".")[-1] in c][:n]
    return f" Did you mean: {', '.join(found)}?" if found else ""


def require(module: str, extra: str) -> object:
    """Import an optional dependency or raise DependencyError naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised via monkeypatch in tests
        raise DependencyError(
            f"'{module}' is required for this feature but is not installed. "
            f"Install it with: pip install 'sparsetorch[{extra}]'"
        ) from exc


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """Validate a sparsity in [0, 1) and return it as float."""
    try:
        s = float(sparsity)
    except (TypeError, ValueError) as exc:
        raise SparsityValueError(f"{name} must be a number in [0, 1), got {sparsity!r}.") from exc
    if not (0.0 <= s < 1.0) or s != s:
        raise SparsityValueError(
            f"{name} must be in [0, 1) (fraction of weights set to zero), got {sparsity!r}. "
            "Use e.g. 0.5 for 50% sparsity; 1.0 would remove every weight."
        )
    return s
