"""Nested state dicts as one safetensors file: tensors as safetensors, everything else as JSON.

Resumable state (a Sparsifier's ``state_dict()``: step counters, masks, RNG state, per-method
buffers) is a tree of dicts, lists and tuples whose leaves are tensors, numbers, strings, bools
and None. ``torch.save`` would store it with pickle, and reading a pickle runs whatever code the
file names -- a crafted checkpoint folder becomes code execution on resume. Here the tensors go
into a plain safetensors file (named ``t0``, ``t1``, ... in tree order) and the tree itself into
its JSON metadata (key :data:`META_KEY`), with tensors replaced by ``{"__tensor__": "t0"}``.
Reading it parses JSON and raw tensor bytes only.

Round trip: tensors come back bit-identical (same dtype, shape and bytes, on the CPU);
dicts, lists, tuples, ints, floats (nan/inf included), strings, bools and None come back equal
and of the same type. Anything else is refused with ``TypeError`` at save time.

    from sparsetorch.statefile import save_state, load_state
    save_state(sparsifier.state_dict(), "ckpt/sparsifier.safetensors")
    sparsifier.load_state_dict(load_state("ckpt/sparsifier.safetensors"))
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from .atomic import atomic_path
from .errors import CheckpointError

#: metadata key of the JSON tree inside the safetensors header
META_KEY = "sparsetorch_state"
FORMAT_VERSION = 1

_TENSOR, _TUPLE, _DICT, _FLOAT = "__tensor__", "__tuple__", "__dict__", "__float__"


def _plain_key(k: object) -> bool:
    return isinstance(k, str) and not k.startswith("__")


def flatten_state(state: Any) -> tuple[dict[str, Tensor], Any]:
    """Split ``state`` into ``({name: cpu tensor}, json-able tree)``; see the module docstring."""
    tensors: dict[str, Tensor] = {}

    def enc(x: Any) -> Any:
        if isinstance(x, Tensor):
            name = f"t{len(tensors)}"
            # an own contiguous CPU copy: safetensors refuses tensors that share storage
            tensors[name] = x.detach().to("cpu", copy=True).contiguous()
            return {_TENSOR: name}
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, int):
            return int(x)
        if isinstance(x, float):
            return float(x) if math.isfinite(x) else {_FLOAT: repr(float(x))}
        if isinstance(x, Mapping):
            if all(_plain_key(k) for k in x):
                return {k: enc(v) for k, v in x.items()}
            return {_DICT: [[enc(k), enc(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {_TUPLE: [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        raise TypeError(
            f"cannot store a {type(x).__name__} in a state file (tensors, numbers, strings, "
            "bools, None, dicts, lists and tuples only); convert it in state_dict()."
        )

    return tensors, enc(state)


def unflatten_state(tensors: Mapping[str, Tensor], tree: Any, *, source: str = "state") -> Any:
    """Inverse of :func:`flatten_state`; :class:`CheckpointError` for a malformed tree."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{source} is corrupt: {what}. Re-create it (it was not written "
                               "by this version of sparsetorch, or was modified).")

    def dec(x: Any) -> Any:
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            raise bad(f"unexpected JSON value {type(x).__name__}")
        if len(x) == 1:
            (k, v), = x.items()
            if k == _TENSOR:
                if not isinstance(v, str) or v not in tensors:
                    raise bad(f"tensor {v!r} is referenced but not stored")
                return tensors[v]
            if k == _TUPLE:
                if not isinstance(v, list):
                    raise bad("a tuple entry is not a list")
                return tuple(dec(e) for e in v)
            if k == _FLOAT:
                if v not in ("nan", "inf", "-inf"):
                    raise bad(f"unknown float {v!r}")
                return float(v)
            if k == _DICT:
                if not isinstance(v, list) or not all(isinstance(p, list) and len(p) == 2 for p in v):
                    raise bad("a dict entry is not a list of [key, value] pairs")
                out = {}
                for kk, vv in v:
                    key = dec(kk)
                    try:
                        out[key] = dec(vv)
                    except TypeError:  # unhashable key
                        raise bad(f"unhashable dict key {key!r}") from None
                return out
        if not all(_plain_key(k) for k in x):
            raise bad(f"reserved key in {sorted(x)[:3]}")
        return {k: dec(v) for k, v in x.items()}

    return dec(tree)


def save_state(state: Any, path: str | os.PathLike[str], *, overwrite: bool = True) -> Path:
    """Write ``state`` to one safetensors file atomically (no pickle); return the path.

    ``overwrite=True`` replaces an existing file, like any save by name (see
    :func:`sparsetorch.atomic.atomic_path`).
    """
    from safetensors.torch import save_file

    tensors, tree = flatten_state(state)
    meta = {
        "format": "pt",
        META_KEY: json.dumps({"version": FORMAT_VERSION, "state": tree}, allow_nan=False,
                             separators=(",", ":")),
    }
    target = Path(path)
    with atomic_path(target, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return target


def load_state(path: str | os.PathLike[str]) -> Any:
    """Read a :func:`save_state` file; :class:`CheckpointError` if it is missing, truncated,
    not safetensors or not a state file. Tensors are on the CPU."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"state file {p} does not exist.")
    try:
        with safe_open(str(p), "pt") as fh:
            meta = fh.metadata() or {}
            raw = meta.get(META_KEY)
            if raw is None:
                raise CheckpointError(f"{p} is a safetensors file but not a sparsetorch state file "
                                      f"(no {META_KEY!r} metadata).")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - no __iter__
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"cannot read state file {p}: {exc}. It is truncated or corrupt.") from exc
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(f"state file {p} has corrupt metadata: {exc}.") from exc
    if not isinstance(doc, dict) or "state" not in doc:
        raise CheckpointError(f"state file {p} has no 'state' entry; it is corrupt.")
    version = doc.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"state file {p} has format version {version!r}; this sparsetorch "
                              f"reads version {FORMAT_VERSION} or older. Upgrade sparsetorch.")
    return unflatten_state(tensors, doc["state"], source=f"state file {p}")


__all__ = ["FORMAT_VERSION", "META_KEY", "flatten_state", "load_state", "save_state",
           "unflatten_state"]
