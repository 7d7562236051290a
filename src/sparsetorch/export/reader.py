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

**Trust**: the container is checked by safetensors' own rules (entries tile the data buffer
exactly: no overlaps, gaps or trailing bytes), every header field and part is validated, a
version-2 file's SHA-256 content checksum is verified, and the decoded size is checked against
``max_bytes`` (default: 64 MiB + 64x the file size) -- all before any tensor is decoded.

Every problem with the file (truncated, corrupt, inconsistent, a newer format version) raises
:class:`ReadError`, whose ``tensor`` attribute names the tensor concerned (or is None); a file
over the size limit raises its subclass :class:`ReadLimitError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

try:  # inside the sparsetorch package
    from ..errors import LimitError as _LimitBase
    from .formats import (
        DTYPES,
        FORMATS,
        QUANT_DTYPES,
        QUANT_SCHEMES,
        Format,
        FormatError,
        dequantize_int8_rows,
        get_format,
        nonzero,
    )
except ImportError:  # loaded as a plain file next to formats.py
    from formats import (  # type: ignore[no-redef]
        DTYPES,
        FORMATS,
        QUANT_DTYPES,
        QUANT_SCHEMES,
        Format,
        FormatError,
        dequantize_int8_rows,
        get_format,
        nonzero,
    )

    class _LimitBase(ValueError):  # type: ignore[no-redef]
        """Stand-in for sparsetorch.errors.LimitError when this file is used on its own."""

__all__ = [
    "HEADER_KEY",
    "CHECKSUM_KEY",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MIN_FORMAT_VERSION",
    "ReadError",
    "ReadLimitError",
    "Checkpoint",
    "TensorInfo",
    "read",
    "read_header",
    "bf16_bits_to_float32",
    "default_limit",
]

#: key of the sparsetorch JSON header inside the safetensors ``__metadata__``
HEADER_KEY = "sparsetorch"
#: key of the content checksum inside the safetensors ``__metadata__`` (format version >= 2)
CHECKSUM_KEY = "sparsetorch.sha256"
#: value of the header's ``"format"`` field
FORMAT_NAME = "sparsetorch-compressed"
#: the newest format version this reader understands (the writer writes it only for files
#: that need it: quantized tensors; other files are written as version 2)
FORMAT_VERSION = 3
#: the oldest format version there is
MIN_FORMAT_VERSION = 1
#: safetensors JSON headers larger than this are refused (same limit as safetensors itself)
MAX_HEADER_BYTES = 100_000_000
#: default bound on decoded bytes: this much for free, plus ``MAX_EXPANSION`` x the file size.
#: 64x covers every format but csr at any sparsity (bitmask of float64 at 100% sparsity: 64x);
#: a plausible file beyond it (e.g. a csr-stored all-zero model) needs an explicit ``max_bytes``.
FREE_DECODED_BYTES = 1 << 26
MAX_EXPANSION = 64
#: safetensors dtype code of each part that is not ``values`` (``values`` has the logical dtype)
_INDEX_CODES = frozenset({"U8", "U16", "U32", "U64"})
_PART_CODES: dict[str, frozenset[str]] = {
    "bitmask": frozenset({"U8"}),
    "mask": frozenset({"U8"}),
    "indices": frozenset({"U8"}),
    "row_ptr": _INDEX_CODES,
    "col_idx": _INDEX_CODES,
    "scales": frozenset({"F32"}),
}

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


class ReadLimitError(ReadError, _LimitBase):
    """The file declares more decoded bytes than the limit (``max_bytes``) allows; raised before
    anything is decoded. Inside sparsetorch it is also a :class:`sparsetorch.errors.LimitError`."""

    def __init__(self, message: str, needed: int, limit: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.limit = limit


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
    #: quantization scheme of the stored values (format version >= 3), None for plain values
    quantization: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype][2]


def _is_int(x: Any) -> bool:
    return type(x) is int


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _json(text: str) -> Any:
    """Strict JSON: duplicate keys and NaN/Infinity are errors (a corrupt header must not parse
    into something else)."""
    return json.loads(text, object_pairs_hook=_strict_object, parse_constant=_no_constant)


def default_limit(file_bytes: int) -> int:
    """The decoded-bytes limit used when ``max_bytes`` is None: ``64 MiB + 64 x file size``."""
    return FREE_DECODED_BYTES + MAX_EXPANSION * file_bytes


def _parse_safetensors(data: memoryview, where: str) -> tuple[dict[str, tuple[np.dtype, tuple[int, ...], int, int, str]], dict[str, str], int]:
    """Validate the safetensors container by safetensors' own rules; return (entries, metadata,
    data start). Entries are ``key -> (numpy dtype, shape, begin, end, safetensors dtype code)``
    with absolute byte positions."""
    size = len(data)
    if size < 8:
        raise ReadError(f"{where} is truncated: {size} bytes, not even a safetensors header length")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise ReadError(f"{where}: safetensors header of {n} bytes is larger than {MAX_HEADER_BYTES}")
    if n > size - 8:
        raise ReadError(f"{where} is truncated: header says {n} header bytes but the file has {size - 8} after the length")
    if n == 0 or data[8] != ord("{"):
        raise ReadError(f"{where}: safetensors header does not start with '{{'")
    try:
        raw = _json(bytes(data[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ReadError(f"{where}: safetensors header is not valid JSON ({exc})") from None
    # the '{' check above makes ``raw`` a JSON object
    start = 8 + n
    buf_len = size - start
    meta = raw.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ReadError(f"{where}: safetensors __metadata__ must map strings to strings")
    entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int, str]] = {}
    for key, e in raw.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise ReadError("stored entry must be an object with exactly dtype, shape and data_offsets", key)
        code = e["dtype"]
        dt = _ST_DTYPES.get(code) if isinstance(code, str) else None
        shape, offs = e["shape"], e["data_offsets"]
        if dt is None:
            raise ReadError(f"stored entry has unsupported dtype {code!r}", key)
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape) or len(shape) > 16:
            raise ReadError(f"stored entry has invalid shape {shape!r}", key)
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs):
            raise ReadError(f"stored entry has invalid data_offsets {offs!r}", key)
        b, en = offs
        if not (0 <= b <= en):
            raise ReadError(f"stored entry has invalid data_offsets {offs}", key)
        if en > buf_len:
            raise ReadError(f"stored entry's data_offsets {offs} lie outside the {buf_len}-byte data buffer (truncated file?)", key)
        if math.prod(shape) * dt.itemsize != en - b:
            raise ReadError(f"stored entry of shape {shape} {code} needs {math.prod(shape) * dt.itemsize} bytes, has {en - b}", key)
        entries[key] = (dt, tuple(shape), start + b, start + en, code)
    # safetensors' layout rule: sorted by offsets, the entries tile the data buffer exactly
    # (no gaps, no overlaps, no trailing bytes)
    expected = start
    for key, (_, _, b, en, _) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if b != expected:
            what = "overlaps the previous entry" if b < expected else "leaves a gap after the previous entry"
            raise ReadError(f"stored entry's data {what} (data_offsets must tile the data buffer)", key)
        expected = en
    if expected != size:
        raise ReadError(f"{where}: {size - expected} trailing bytes after the last stored tensor; the file is corrupt")
    return entries, meta, start


def _parse_info(name: str, d: Any, entries: Mapping[str, Any], version: int) -> TensorInfo:
    if not isinstance(d, dict):
        raise ReadError("header entry is not an object", name)
    masked = d.get("masked", False)
    if not isinstance(masked, bool):
        raise ReadError(f"invalid masked flag {masked!r}", name)
    if "tied_to" in d:
        t = d["tied_to"]
        if not isinstance(t, str):
            raise ReadError(f"tied_to must be a tensor name, got {t!r}", name)
        return TensorInfo(name, Format.DENSE, (), "float32", {}, {}, None, masked, tied_to=t)
    try:
        fmt = Format(d.get("format"))
    except (ValueError, TypeError):
        raise ReadError(f"unknown format {d.get('format')!r}; known: {', '.join(f.value for f in Format)}", name) from None
    shape, dtype = d.get("shape"), d.get("dtype")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape) or len(shape) > 16:
        raise ReadError(f"invalid shape {shape!r}", name)
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ReadError(f"unsupported dtype {dtype!r}", name)
    parts, params = d.get("parts"), d.get("params", {})
    if not isinstance(parts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in parts.items()):
        raise ReadError(f"invalid parts {parts!r}", name)
    spec = FORMATS[fmt]
    names = set(parts)
    quant = d.get("quantization")
    scheme = None
    if quant is not None:
        if version < 3:
            raise ReadError(f"quantization needs format_version >= 3, the file says {version}", name)
        if not isinstance(quant, dict) or set(quant) != {"scheme"} or quant["scheme"] not in QUANT_SCHEMES:
            raise ReadError(f"invalid quantization {quant!r}; known: {{'scheme': one of {', '.join(QUANT_SCHEMES)}}}", name)
        scheme = quant["scheme"]
        if dtype not in QUANT_DTYPES or len(shape) != 2:
            raise ReadError(f"a quantized tensor must be 2-D float32/float16/bfloat16, is {shape} {dtype}", name)
        if "scales" not in names:
            raise ReadError("a quantized tensor needs a 'scales' part", name)
        names = names - {"scales"}
    elif "scales" in names:
        raise ReadError("a 'scales' part belongs to quantized tensors only", name)
    if not spec.required_parts <= names <= spec.required_parts | spec.optional_parts:
        raise ReadError(f"{fmt.value} needs parts {sorted(spec.required_parts)}"
                        + (f" (optional: {sorted(spec.optional_parts)})" if spec.optional_parts else "")
                        + f", has {sorted(names)}", name)
    if "mask" in names and not masked:
        raise ReadError("a tensor that is not masked has a 'mask' part", name)
    if fmt is Format.DENSE and masked and version >= 2 and "mask" not in names:
        raise ReadError("a masked dense tensor needs a 'mask' part (format version >= 2)", name)
    for part, key in parts.items():
        if key not in entries:
            raise ReadError(f"part '{part}' refers to stored tensor {key!r}, which is missing from the file", name)
        code = entries[key][4]
        values_code = "I8" if scheme is not None else DTYPES[dtype][1]
        want = frozenset({values_code}) if part == "values" else _PART_CODES.get(part, frozenset())
        if code not in want:
            raise ReadError(f"part '{part}' is stored as {code}, expected {' or '.join(sorted(want))}", name)
    if not isinstance(params, dict) or not all(isinstance(k, str) and _is_int(v) for k, v in params.items()):
        raise ReadError(f"invalid params {params!r}", name)
    if set(params) != set(spec.param_names):
        raise ReadError(f"{fmt.value} needs params {sorted(spec.param_names)}, has {sorted(params)}", name)
    pattern = d.get("pattern")
    if pattern is not None and not isinstance(pattern, str):
        raise ReadError(f"invalid pattern {pattern!r}", name)
    return TensorInfo(name, fmt, tuple(shape), dtype, dict(parts), dict(params), pattern, masked,
                      quantization=scheme)


class Checkpoint:
    """A validated, opened compressed checkpoint; decode tensors one at a time with :meth:`get`.

    Opening reads the file, checks the container and the header (and the content checksum, when
    the file has one and ``verify`` is true) and the decoded size against ``max_bytes`` -- all
    before any tensor is decoded. ``max_bytes=None`` uses :func:`default_limit` (64 MiB + 64x the
    file size); pass a number of bytes to allow more (or less). ``header_only=True`` skips the
    size check for header inspection (sizes, formats); :meth:`get` then refuses to decode.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int | None = None,
                 verify: bool = True, header_only: bool = False) -> None:
        if max_bytes is not None and (not _is_int(max_bytes) or max_bytes < 0):
            raise _LimitBase(f"max_bytes must be a non-negative integer number of bytes or None, got {max_bytes!r}")
        self.path = os.fspath(path)
        where = self.path
        try:
            with open(self.path, "rb") as fh:
                self._data = memoryview(fh.read())
        except FileNotFoundError:
            raise ReadError(f"checkpoint {where} does not exist") from None
        except IsADirectoryError:
            raise ReadError(f"{where} is a directory, not a checkpoint file") from None
        except OSError as exc:
            raise ReadError(f"cannot read {where}: {exc.strerror or exc}") from None
        self._entries, meta, start = _parse_safetensors(self._data, where)
        if HEADER_KEY not in meta:
            raise ReadError(f"{where} is a safetensors file without a sparsetorch header (metadata key {HEADER_KEY!r}); "
                            "it was not written by sparsetorch.save")
        digest = meta.get(CHECKSUM_KEY)
        #: whether the file carries a content checksum (verified when ``verify`` was true)
        self.checksummed = digest is not None
        if digest is not None and verify:
            try:
                h = hashlib.sha256(meta[HEADER_KEY].encode("utf-8"))
            except UnicodeEncodeError:
                raise ReadError(f"{where}: the sparsetorch header is not valid UTF-8 text") from None
            h.update(self._data[start:])
            if h.hexdigest() != digest:
                raise ReadError(f"{where}: content checksum mismatch (sha256 of the header and data is "
                                f"{h.hexdigest()}, the file says {digest!r}); the file was changed or damaged "
                                "after it was written -- get a fresh copy or re-export it")
        try:
            h = _json(meta[HEADER_KEY])
        except (ValueError, RecursionError) as exc:
            raise ReadError(f"{where}: the sparsetorch header is not valid JSON ({exc})") from None
        if not isinstance(h, dict) or h.get("format") != FORMAT_NAME:
            raise ReadError(f"{where}: the sparsetorch header does not declare format {FORMAT_NAME!r}")
        ver = h.get("format_version")
        if not _is_int(ver) or ver < MIN_FORMAT_VERSION:
            raise ReadError(f"{where}: invalid format_version {ver!r} (an integer >= {MIN_FORMAT_VERSION})")
        if ver > FORMAT_VERSION:
            raise ReadError(f"{where} has format_version {ver}, newer than the {FORMAT_VERSION} this reader "
                            "understands; upgrade sparsetorch")
        algo = h.get("checksum")
        if algo is not None and (ver < 2 or algo != "sha256"):
            raise ReadError(f"{where}: unknown checksum {algo!r} for format_version {ver} (only 'sha256', version >= 2)")
        if (algo is None) != (digest is None):
            raise ReadError(f"{where}: the header {'declares' if algo else 'does not declare'} a checksum but the "
                            f"file {'lacks' if algo else 'has'} metadata key {CHECKSUM_KEY!r}; the file is corrupt")
        if digest is not None and (len(digest) != 64 or digest.strip("0123456789abcdef")):
            raise ReadError(f"{where}: checksum {digest!r} is not 64 lowercase hex digits")
        for key, kind in (("hf_config", dict), ("hf_class", str), ("user_metadata", dict)):
            if key in h and not isinstance(h[key], kind):
                raise ReadError(f"{where}: header field {key!r} must be a JSON {kind.__name__}")
        if "user_metadata" in h and not all(isinstance(v, str) for v in h["user_metadata"].values()):
            raise ReadError(f"{where}: user_metadata must map strings to strings")
        tensors = h.get("tensors")
        if not isinstance(tensors, dict):
            raise ReadError(f"{where}: the sparsetorch header has no 'tensors' object")
        self.header: dict[str, Any] = h
        self.version: int = ver
        self.infos: dict[str, TensorInfo] = {n: _parse_info(n, d, self._entries, ver) for n, d in tensors.items()}
        users: dict[str, str] = {}
        for n, info in self.infos.items():
            if info.tied_to is not None:
                target = self.infos.get(info.tied_to)
                if target is None or target.tied_to is not None:
                    raise ReadError(f"tied_to names {info.tied_to!r}, which is not a stored tensor", n)
                if info.masked and not target.masked:
                    raise ReadError(f"is masked but the tensor it is tied to ({info.tied_to!r}) is not", n)
            for key in info.parts.values():
                if key in users:
                    raise ReadError(f"stored tensor {key!r} is a part of both {users[key]!r} and {n!r}", n)
                users[key] = n
        orphans = sorted(set(self._entries) - set(users))
        if orphans:
            raise ReadError(f"{where}: stored tensor {orphans[0]!r} belongs to no tensor of the header; the file is corrupt")
        #: decoded bytes: every stored tensor, plus one byte per element of each mask
        self.decoded_bytes = sum(i.nbytes + (i.numel if i.masked else 0) for i in self.infos.values() if i.tied_to is None)
        #: the limit the decoded bytes were checked against
        self.limit = default_limit(len(self._data)) if max_bytes is None else max_bytes
        self.header_only = header_only
        if not header_only and self.decoded_bytes > self.limit:
            how = ("the default limit for this file (64 MiB + 64x its size: a larger declared size is implausible "
                   "unless the file is mostly csr)" if max_bytes is None else "max_bytes")
            raise ReadLimitError(
                f"{where}: decoding needs {self.decoded_bytes} bytes, more than {how} = {self.limit}; if you trust "
                f"this file, pass max_bytes={self.decoded_bytes} (or more)", self.decoded_bytes, self.limit)

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
        if key not in self._entries:
            raise ReadError(f"no stored tensor {key!r} in the file")
        dt, shape, b, e, _ = self._entries[key]
        return np.frombuffer(self._data[b:e], dtype=dt).reshape(shape)

    def get(self, name: str, bf16: str = "bits") -> tuple[np.ndarray, np.ndarray | None]:
        """Decode ``name`` to ``(dense array, mask)``. The mask is the stored positions of a
        masked tensor (for a version-1 dense one: its non-zeros) and None for an unmasked one."""
        if bf16 not in ("bits", "float32"):
            raise ValueError(f"bf16 must be 'bits' or 'float32', got {bf16!r}")
        if self.header_only:
            raise ReadError("this checkpoint was opened with header_only=True; open it again to decode", name)
        info = self.info(name)
        try:
            parts = {p: self.raw(k) for p, k in info.parts.items()}
            fmt = get_format(info.format)
            if info.quantization is not None:  # int8 values in the format's layout, then per-row scales
                scales = parts.pop("scales")
                q, sup = fmt.decompress(parts, info.shape, "int8", **info.params)
                arr = dequantize_int8_rows(np.asarray(q), scales, info.dtype)
            else:
                arr, sup = fmt.decompress(parts, info.shape, info.dtype, **info.params)
            arr = np.array(arr, copy=True)  # own the memory, writable
        except FormatError as exc:
            raise ReadError(f"{info.format.value} data is corrupt: {exc}", name) from None
        except (ValueError, IndexError, TypeError, OverflowError, MemoryError) as exc:
            raise ReadError(f"{info.format.value} data cannot be decoded: {type(exc).__name__}: {exc}", name) from None
        if not info.masked:
            sup = None
        elif sup is None:  # a version-1 masked dense tensor: its mask is its non-zeros
            sup = nonzero(arr, info.dtype)
        if info.dtype == "bfloat16" and bf16 == "float32":
            arr = bf16_bits_to_float32(arr)
        return arr, sup

    def stored_bytes(self, name: str) -> int:
        """Bytes of ``name``'s parts in the file (0 for a tied tensor)."""
        if name not in self.infos:
            raise ReadError("no such tensor in the checkpoint", name)
        info = self.infos[name]
        if info.tied_to is not None:
            return 0
        return sum(self._entries[k][3] - self._entries[k][2] for k in info.parts.values())


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bits (uint16) to float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_header(path: str | os.PathLike[str], *, verify: bool = True) -> dict[str, Any]:
    """The sparsetorch JSON header of a checkpoint (validated; checksum verified by default)."""
    return Checkpoint(path, verify=verify, header_only=True).header


def read(path: str | os.PathLike[str], bf16: str = "bits", *, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint as dense numpy arrays (pruned positions are +0.0).

    ``bf16="bits"`` returns bfloat16 tensors as uint16 raw bits, ``"float32"`` widens them.
    Tied tensors (e.g. ``lm_head.weight`` tied to the embedding) appear under both names.
    ``max_bytes`` bounds the decoded bytes (see :class:`Checkpoint`); it is checked before
    anything is decoded.
    """
    if bf16 not in ("bits", "float32"):
        raise ValueError(f"bf16 must be 'bits' or 'float32', got {bf16!r}")
    ck = Checkpoint(path, max_bytes=max_bytes)
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
