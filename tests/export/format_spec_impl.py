"""An independent implementation of docs/format.md for tests: written from the spec alone, with
plain Python loops (slow, small tensors only) and none of sparsetorch's code.

* :func:`parse` / :func:`build`: the safetensors container (8-byte little-endian header length,
  JSON header, data buffer).
* :func:`checksum`: the version-2 content checksum.
* :func:`decode_file`: every tensor of a checkpoint as ``(numpy array, mask or None)``; bf16 as
  uint16 bits.
* :func:`rewrite`: edit a checkpoint's stored arrays / header and write it back with a correct
  checksum (so a test reaches the check it is about instead of the checksum).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable

import numpy as np

ST_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
    "I8": "i1", "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BOOL": "?",
}
LOGICAL = {
    "float64": "<f8", "float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "int64": "<i8",
    "int32": "<i4", "int16": "<i2", "int8": "i1", "uint64": "<u8", "uint32": "<u4", "uint16": "<u2",
    "uint8": "u1", "bool": "?",
}


def parse(data: bytes) -> tuple[dict[str, tuple[str, list[int], bytes]], dict[str, str]]:
    """``{key: (dtype code, shape, raw bytes)}`` and ``__metadata__``; asserts the layout rules."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {})
    body = data[8 + n :]
    spans = sorted((e["data_offsets"][0], e["data_offsets"][1], k) for k, e in header.items())
    pos = 0
    for b, e, k in spans:
        assert b == pos, f"{k}: gap or overlap"
        pos = e
    assert pos == len(body), "data buffer not covered exactly"
    out = {k: (e["dtype"], e["shape"], body[e["data_offsets"][0] : e["data_offsets"][1]]) for k, e in header.items()}
    return out, meta


def checksum(header: str, body: bytes) -> str:
    """SHA-256 of the sparsetorch header string (UTF-8) followed by the data buffer."""
    return hashlib.sha256(header.encode("utf-8") + body).hexdigest()


def build(entries: dict[str, tuple[str, list[int], bytes]], meta: dict[str, str]) -> bytes:
    """A safetensors file with the entries in the given order."""
    header: dict = {"__metadata__": meta}
    body = b""
    for k, (code, shape, raw) in entries.items():
        header[k] = {"dtype": code, "shape": shape, "data_offsets": [len(body), len(body) + len(raw)]}
        body += raw
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def body_of(entries: dict[str, tuple[str, list[int], bytes]]) -> bytes:
    return b"".join(raw for _, _, raw in entries.values())


def rewrite(data: bytes, edit_entries: Callable[[dict], None] | None = None,
            edit_header: Callable[[dict], None] | None = None, *, keep_checksum: bool = True) -> bytes:
    """Apply edits and rebuild; the checksum (when the file has one) is recomputed."""
    entries, meta = parse(data)
    if edit_entries is not None:
        edit_entries(entries)
    header = json.loads(meta["sparsetorch"])
    if edit_header is not None:
        edit_header(header)
    meta = dict(meta)
    meta["sparsetorch"] = json.dumps(header)
    if "sparsetorch.sha256" in meta and keep_checksum:
        meta["sparsetorch.sha256"] = checksum(meta["sparsetorch"], body_of(entries))
    return build(entries, meta)


def array(entry: tuple[str, list[int], bytes]) -> np.ndarray:
    code, shape, raw = entry
    return np.frombuffer(raw, dtype=np.dtype(ST_DTYPES[code])).reshape(shape)


# --------------------------------------------------------------------------- decoders
def lsb_bits(raw: bytes, count: int) -> list[int]:
    """Bit ``i`` is bit ``i % 8`` (least significant first) of byte ``i // 8``."""
    return [(raw[i // 8] >> (i % 8)) & 1 for i in range(count)]


def combinations(m: int, n: int) -> list[tuple[int, ...]]:
    """n-subsets of range(m) as ascending tuples, in lexicographic order (no itertools)."""
    if n == 0:
        return [()]
    out = []
    for first in range(m):
        for rest in combinations(m - first - 1, n - 1):
            out.append((first, *(first + 1 + r for r in rest)))
    return out


def _groups(shape: list[int], m: int) -> list[list[tuple[int, ...]]]:
    """Index tuples of each n:m group, in group order (docs/format.md, n:m)."""
    if len(shape) == 1:
        return [[(g * m + j,) for j in range(m)] for g in range(shape[0] // m)]
    out_, in_, ks = shape[0], shape[1], shape[2:]
    groups = []
    for o in range(out_):
        for k in np.ndindex(*ks) if ks else [()]:
            for g in range(in_ // m):
                groups.append([(o, g * m + j, *k) for j in range(m)])
    return groups


def decode(info: dict, entries: dict, version: int) -> tuple[np.ndarray, np.ndarray | None]:
    shape, dt = info["shape"], np.dtype(LOGICAL[info["dtype"]])
    numel = math.prod(shape)
    parts = {p: entries[k] for p, k in info["parts"].items()}
    out = np.zeros(shape, dtype=dt)
    mask = np.zeros(shape, dtype=bool)
    flat_out, flat_mask = out.reshape(-1), mask.reshape(-1)
    fmt = info["format"]
    if fmt == "dense":
        out = array(parts["values"]).copy()
        if "mask" in parts:
            mask = np.array(lsb_bits(parts["mask"][2], numel), dtype=bool).reshape(shape)
        elif info.get("masked"):
            assert version == 1
            mask = (out & 0x7FFF) != 0 if info["dtype"] == "bfloat16" else out != 0
        else:
            mask = None
        return out, mask
    values = array(parts["values"]).reshape(-1)
    if fmt == "bitmask":
        bits = lsb_bits(parts["bitmask"][2], numel)
        j = 0
        for i, b in enumerate(bits):
            if b:
                flat_out[i], flat_mask[i] = values[j], True
                j += 1
        assert j == len(values)
    elif fmt == "csr":
        rows = 1 if len(shape) == 1 else shape[0]
        cols = shape[0] if len(shape) == 1 else math.prod(shape[1:])
        row_ptr = [int(x) for x in array(parts["row_ptr"])]
        col_idx = [int(x) for x in array(parts["col_idx"])]
        for r in range(rows):
            for j in range(row_ptr[r], row_ptr[r + 1]):
                assert col_idx[j] < cols
                flat_out[r * cols + col_idx[j]] = values[j]
                flat_mask[r * cols + col_idx[j]] = True
    elif fmt == "n:m":
        n, m, b = info["params"]["n"], info["params"]["m"], info["params"]["index_bits"]
        combos = combinations(m, n)
        groups = _groups(shape, m)
        bits = lsb_bits(parts["indices"][2], len(groups) * b)
        for g, idx in enumerate(groups):
            code = sum(bits[g * b + j] << j for j in range(b))
            for v, pos in zip(values[g * n : (g + 1) * n], combos[code]):
                out[idx[pos]], mask[idx[pos]] = v, True
    else:
        raise AssertionError(fmt)
    return out, mask


def decode_file(data: bytes) -> tuple[dict[str, tuple[np.ndarray, np.ndarray | None]], dict]:
    """All tensors by the spec: ``{name: (array, mask)}`` (mask None for unmasked tensors) and the
    sparsetorch header. Verifies the checksum when there is one."""
    entries, meta = parse(data)
    header = json.loads(meta["sparsetorch"])
    if header.get("checksum"):
        assert meta["sparsetorch.sha256"] == checksum(meta["sparsetorch"], data[8 + struct.unpack("<Q", data[:8])[0] :])
    out = {}
    for name, info in header["tensors"].items():
        if "tied_to" not in info:
            a, m = decode(info, entries, header["format_version"])
            out[name] = (a, m if info.get("masked") else None)
    for name, info in header["tensors"].items():
        if "tied_to" in info:
            a, m = out[info["tied_to"]]
            out[name] = (a, m if info.get("masked") else None)
    return out, header
