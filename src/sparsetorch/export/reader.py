"""Read a sparsetorch compressed checkpoint with numpy only (no torch, no safetensors needed).

This file and its sibling ``formats.py`` are self-contained: copy both into any project (or
put this folder on ``sys.path`` and ``import reader``) to read the format described in
``docs/format.md``. Inside sparsetorch, the torch loader uses the same code.

>>> from sparsetorch.export.reader import read            # doctest: +SKIP
>>> arrays = read("model.sparsetorch.safetensors")       # doctest: +SKIP
>>> arrays["model.layers.0.mlp.up_proj.weight"].shape     # doctest: +SKIP

**bfloat16**: numpy has no bfloat16, so by default bf16 tensors are returned as ``uint16``
arrays holding the raw bf16 bits (exact; ``bf16="bits"``). Pass ``bf16="float32"`` to get
them widened to float32 (also exact: every bf16 value is a float32 value).

Every problem with the file (truncated, corrupt, inconsistent, a newer format version) raises
:class:`ReadError`, whose ``tensor`` attribute names the tensor concerned (or is None).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

try:  # inside the sparsetorch package
    from .formats import DTYPES, Format, FormatError, get_format
except ImportError:  # loaded as a plain file next to formats.py
    from formats import DTYPES, Format, FormatError, get_format  # type: ignore[no-redef]

__all__ = [
    "HEADER_KEY",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ReadError",
    "Checkpoint",
    "TensorInfo",
    "read",
    "read_header",
    "bf16_bits_to_float32",
]

#: key of the sparsetorch JSON header inside the safetensors ``__metadata__``
HEADER_KEY = "sparsetorch"
#: value of the header's ``"format"`` field
FORMAT_NAME = "sparsetorch-compressed"
#: the newest format version this reader understands
FORMAT_VERSION = 1
#: safetensors JSON headers larger than this are refused (same limit as safetensors itself)
MAX_HEADER_BYTES = 100_000_000
#: decoded bytes allowed in total: this much for free, plus ``MAX_EXPANSION`` x the file size
FREE_DECODED_BYTES = 1 << 26
MAX_EXPANSION = 1 << 16

_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "U16": np.dtype("<u2"),
    "U32": np.dtype("<u4"),
    "U64": np.dtype("<u8"),
    "BOOL": np.dtype("bool"),
}


class ReadError(ValueError):
    """The file is not a readable sparsetorch checkpoint; ``tensor`` names the tensor at fault."""

    def __init__(self, message: str, tensor: str | None = None) -> None:
        super().__init__(f"{tensor}: {message}" if tensor else message)
        self.tensor = tensor
        self.reason = message


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as described by the header."""

    name: str
    format: Format
    shape: tuple[int, ...]
    dtype: str
    parts: dict[str, str]
    params: dict[str, int]
    pattern: str | None
    masked: bool
    tied_to: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype][2]


def _is_int(x: Any) -> bool:
    return type(x) is int


def _parse_safetensors(data: memoryview, where: str) -> tuple[dict[str, tuple[np.dtype, tuple[int, ...], int, int]], dict[str, str], int]:
    """Validate the safetensors container; return (entries, metadata, data start)."""
    size = len(data)
    if size < 8:
        raise ReadError(f"{where} is truncated: {size} bytes, not even a safetensors header length")
    n = int.from_bytes(data[:8], "little")
    if n > size - 8:
        raise ReadError(f"{where} is truncated: header says {n} header bytes but the file has {size - 8} after the length")
    if n > MAX_HEADER_BYTES:
        raise ReadError(f"{where}: safetensors header of {n} bytes is larger than {MAX_HEADER_BYTES}")
    try:
        raw = json.loads(bytes(data[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ReadError(f"{where}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ReadError(f"{where}: safetensors header is not a JSON object")
    start = 8 + n
    buf_len = size - start
    meta = raw.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ReadError(f"{where}: safetensors __metadata__ must map strings to strings")
    entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    for key, e in raw.items():
        if not isinstance(e, dict):
            raise ReadError("stored entry is not an object", key)
        dt = _ST_DTYPES.get(e.get("dtype")) if isinstance(e.get("dtype"), str) else None
        shape, offs = e.get("shape"), e.get("data_offsets")
        if dt is None:
            raise ReadError(f"stored entry has unsupported dtype {e.get('dtype')!r}", key)
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape) or len(shape) > 16:
            raise ReadError(f"stored entry has invalid shape {shape!r}", key)
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs):
            raise ReadError(f"stored entry has invalid data_offsets {offs!r}", key)
        b, en = offs
        if not (0 <= b <= en <= buf_len):
            raise ReadError(f"stored entry's data_offsets {offs} lie outside the {buf_len}-byte data buffer (truncated file?)", key)
        if math.prod(shape) * dt.itemsize != en - b:
            raise ReadError(f"stored entry of shape {shape} {e['dtype']} needs {math.prod(shape) * dt.itemsize} bytes, has {en - b}", key)
        entries[key] = (dt, tuple(shape), start + b, start + en)
    return entries, meta, start


def _parse_info(name: str, d: Any, entries: Mapping[str, Any]) -> TensorInfo:
    if not isinstance(d, dict):
        raise ReadError("header entry is not an object", name)
    if "tied_to" in d:
        t = d["tied_to"]
        if not isinstance(t, str):
            raise ReadError(f"tied_to must be a tensor name, got {t!r}", name)
        return TensorInfo(name, Format.DENSE, (), "float32", {}, {}, None, False, tied_to=t)
    try:
        fmt = Format(d.get("format"))
    except ValueError:
        raise ReadError(f"unknown format {d.get('format')!r}; known: {', '.join(f.value for f in Format)}", name) from None
    shape, dtype = d.get("shape"), d.get("dtype")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape) or len(shape) > 16:
        raise ReadError(f"invalid shape {shape!r}", name)
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ReadError(f"unsupported dtype {dtype!r}", name)
    parts, params = d.get("parts"), d.get("params", {})
    if not isinstance(parts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in parts.items()):
        raise ReadError(f"invalid parts {parts!r}", name)
    for part, key in parts.items():
        if key not in entries:
            raise ReadError(f"part '{part}' refers to stored tensor {key!r}, which is missing from the file", name)
    if not isinstance(params, dict) or not all(isinstance(k, str) and _is_int(v) for k, v in params.items()):
        raise ReadError(f"invalid params {params!r}", name)
    pattern = d.get("pattern")
    if pattern is not None and not isinstance(pattern, str):
        raise ReadError(f"invalid pattern {pattern!r}", name)
    masked = d.get("masked", False)
    if not isinstance(masked, bool):
        raise ReadError(f"invalid masked flag {masked!r}", name)
    return TensorInfo(name, fmt, tuple(shape), dtype, dict(parts), dict(params), pattern, masked)


class Checkpoint:
    """A validated, opened compressed checkpoint; decode tensors one at a time with :meth:`get`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        where = self.path
        try:
            with open(self.path, "rb") as fh:
                self._data = memoryview(fh.read())
        except FileNotFoundError:
            raise ReadError(f"checkpoint {where} does not exist") from None
        except IsADirectoryError:
            raise ReadError(f"{where} is a directory, not a checkpoint file") from None
        self._entries, meta, _ = _parse_safetensors(self._data, where)
        if HEADER_KEY not in meta:
            raise ReadError(f"{where} is a safetensors file without a sparsetorch header (metadata key {HEADER_KEY!r}); "
                            "it was not written by sparsetorch.save")
        try:
            h = json.loads(meta[HEADER_KEY])
        except (ValueError, RecursionError) as exc:
            raise ReadError(f"{where}: the sparsetorch header is not valid JSON ({exc})") from None
        if not isinstance(h, dict) or h.get("format") != FORMAT_NAME:
            raise ReadError(f"{where}: the sparsetorch header does not declare format {FORMAT_NAME!r}")
        ver = h.get("format_version")
        if not _is_int(ver) or ver < 1:
            raise ReadError(f"{where}: invalid format_version {ver!r}")
        if ver > FORMAT_VERSION:
            raise ReadError(f"{where} has format_version {ver}, newer than the {FORMAT_VERSION} this reader "
                            "understands; upgrade sparsetorch")
        tensors = h.get("tensors")
        if not isinstance(tensors, dict):
            raise ReadError(f"{where}: the sparsetorch header has no 'tensors' object")
        self.header: dict[str, Any] = h
        self.infos: dict[str, TensorInfo] = {n: _parse_info(n, d, self._entries) for n, d in tensors.items()}
        for n, info in self.infos.items():
            if info.tied_to is not None:
                target = self.infos.get(info.tied_to)
                if target is None or target.tied_to is not None:
                    raise ReadError(f"tied_to names {info.tied_to!r}, which is not a stored tensor", n)
        total = sum(i.nbytes for i in self.infos.values() if i.tied_to is None)
        limit = FREE_DECODED_BYTES + MAX_EXPANSION * len(self._data)
        if total > limit:
            raise ReadError(f"{where}: the header declares {total} decoded bytes, implausibly many for a "
                            f"{len(self._data)}-byte file (limit {limit}); the header is corrupt")

    # ------------------------------------------------------------------ access
    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def names(self) -> list[str]:
        return list(self.infos)

    def info(self, name: str) -> TensorInfo:
        """The header entry of ``name`` (tied tensors resolved to the stored one)."""
        try:
            info = self.infos[name]
        except KeyError:
            raise ReadError("no such tensor in the checkpoint", name) from None
        return self.infos[info.tied_to] if info.tied_to is not None else info

    def raw(self, key: str) -> np.ndarray:
        """A stored safetensors tensor by its key, as a read-only numpy view (bf16 as uint16)."""
        dt, shape, b, e = self._entries[key]
        return np.frombuffer(self._data[b:e], dtype=dt).reshape(shape)

    def get(self, name: str, bf16: str = "bits") -> tuple[np.ndarray, np.ndarray | None]:
        """Decode ``name`` to ``(dense array, stored-position mask or None for dense format)``."""
        info = self.info(name)
        try:
            parts = {p: self.raw(k) for p, k in info.parts.items()}
            fmt = get_format(info.format)
            arr, sup = fmt.decompress(parts, info.shape, info.dtype, **info.params)
            arr = np.array(arr, copy=True)  # own the memory, writable
        except FormatError as exc:
            raise ReadError(f"{info.format.value} data is corrupt: {exc}", name) from None
        except (ValueError, IndexError, TypeError, OverflowError, MemoryError) as exc:
            raise ReadError(f"{info.format.value} data cannot be decoded: {type(exc).__name__}: {exc}", name) from None
        if info.dtype == "bfloat16":
            if bf16 == "float32":
                arr = bf16_bits_to_float32(arr)
            elif bf16 != "bits":
                raise ValueError(f"bf16 must be 'bits' or 'float32', got {bf16!r}")
        return arr, sup

    def stored_bytes(self, name: str) -> int:
        """Bytes of ``name``'s parts in the file (0 for a tied tensor)."""
        info = self.infos[name]
        if info.tied_to is not None:
            return 0
        return sum(self._entries[k][3] - self._entries[k][2] for k in info.parts.values())


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bits (uint16) to float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sparsetorch JSON header of a checkpoint (validated)."""
    return Checkpoint(path).header


def read(path: str | os.PathLike[str], bf16: str = "bits") -> dict[str, np.ndarray]:
    """All tensors of a checkpoint as dense numpy arrays (pruned positions are +0.0).

    ``bf16="bits"`` returns bfloat16 tensors as uint16 raw bits, ``"float32"`` widens them.
    Tied tensors (e.g. ``lm_head.weight`` tied to the embedding) appear under both names.
    """
    ck = Checkpoint(path)
    out: dict[str, np.ndarray] = {}
    for name in ck:
        info = ck.infos[name]
        if info.tied_to is None:
            out[name] = ck.get(name, bf16=bf16)[0]
    for name in ck:
        info = ck.infos[name]
        if info.tied_to is not None:
            out[name] = out[info.tied_to]
    return out


if __name__ == "__main__":  # pragma: no cover - tiny CLI: list tensors of a checkpoint
    import sys

    ck = Checkpoint(sys.argv[1])
    for n in ck:
        i = ck.info(n)
        print(f"{n}\t{i.format.value}\t{list(i.shape)}\t{i.dtype}\t{ck.stored_bytes(n)}")
