"""Storage formats of a sparsetorch compressed checkpoint: one small class per format.

This module needs only ``numpy`` (no torch): the numpy reader (:mod:`reader`) uses it to
decode, the torch writer uses it to encode, so there is exactly one implementation of each
format. Arrays are numpy arrays; ``bfloat16`` data is carried as its raw ``uint16`` bits
(numpy has no bfloat16), which keeps every round trip bit-exact.

Every format turns one tensor into named *parts* (plain 1-D or N-D arrays stored as
safetensors tensors) plus a few integer *params* written into the JSON header, and back:

* ``dense``   - ``values``: the tensor itself; a masked tensor also has ``mask``: its mask
  packed like ``bitmask`` below (so kept positions whose value is exactly 0 survive).
* ``bitmask`` - ``bitmask``: ``uint8[ceil(numel/8)]``, one bit per element in C order,
  little bit order (element ``i`` is bit ``i % 8`` of byte ``i // 8``), 1 = stored;
  ``values``: the stored elements in C order.
* ``csr``     - over the 2-D view ``[shape[0], prod(shape[1:])]`` (1-D tensors: ``[1, n]``):
  ``row_ptr`` (``rows + 1`` entries), ``col_idx`` (strictly increasing inside each row) and
  ``values``; both index arrays use the smallest unsigned type that holds their largest value.
* ``n:m``     - exactly ``n`` stored elements in every group of ``m`` consecutive elements
  along the input dimension: ``values`` (``n`` per group, in ascending position order) and
  ``indices``: one code per group, the rank of its set of positions among all ``n``-subsets
  of ``range(m)`` in lexicographic order, packed ``index_bits = max(1, bit_length(C(m,n)-1))``
  bits per group, little-endian bit order (3 bits per group for 2:4).

Every part except ``dense`` ``values`` is 1-D. "Non-zero" always means *numerically* non-zero:
``-0.0`` (bf16 bits ``0x8000``) is zero, NaN is non-zero.

Decoders validate everything they read and raise :class:`FormatError` (a ``ValueError``)
with a precise reason; callers turn it into a ``CheckpointError`` naming the tensor.
"""

from __future__ import annotations

import enum
import functools
import itertools
import math
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "Format",
    "FormatError",
    "DTYPES",
    "FORMATS",
    "get_format",
    "to_numpy",
    "nonzero",
    "nm_groups",
    "nm_ungroup",
    "index_dtype",
    "contiguous",
    "pack_bits",
    "unpack_bits",
    "pack_mask",
    "unpack_mask",
    "Dense",
    "Bitmask",
    "CSR",
    "NMPacked",
    "nm_combinations",
    "QUANT_SCHEMES",
    "QUANT_DTYPES",
    "INT8_ROWS",
    "quantize_int8_rows",
    "dequantize_int8_rows",
    "float32_to_bf16_bits",
]


class FormatError(ValueError):
    """A tensor cannot be encoded in a format, or stored parts do not decode."""


class Format(enum.StrEnum):
    """Names of the storage formats, exactly as written in the file header."""

    DENSE = "dense"
    BITMASK = "bitmask"
    CSR = "csr"
    NM = "n:m"


#: header dtype name -> (numpy dtype used in memory, safetensors dtype code, itemsize)
DTYPES: dict[str, tuple[np.dtype, str, int]] = {
    "float64": (np.dtype("<f8"), "F64", 8),
    "float32": (np.dtype("<f4"), "F32", 4),
    "float16": (np.dtype("<f2"), "F16", 2),
    "bfloat16": (np.dtype("<u2"), "BF16", 2),  # raw bits
    "int64": (np.dtype("<i8"), "I64", 8),
    "int32": (np.dtype("<i4"), "I32", 4),
    "int16": (np.dtype("<i2"), "I16", 2),
    "int8": (np.dtype("i1"), "I8", 1),
    "uint64": (np.dtype("<u8"), "U64", 8),
    "uint32": (np.dtype("<u4"), "U32", 4),
    "uint16": (np.dtype("<u2"), "U16", 2),
    "uint8": (np.dtype("u1"), "U8", 1),
    "bool": (np.dtype("bool"), "BOOL", 1),
}


def to_numpy(x: Any, dtype: str | None = None) -> tuple[np.ndarray, str]:
    """Return ``(array, dtype_name)`` for a numpy array or a torch tensor (bf16 as uint16 bits).

    A numpy ``uint16`` array holding bf16 bits needs ``dtype="bfloat16"``. Never imports
    torch: a torch tensor can only be passed if torch is already imported.
    """
    if isinstance(x, np.ndarray):
        if dtype == "bfloat16":
            if x.dtype != np.uint16:
                raise FormatError(f"bfloat16 data must be given as uint16 bits, got {x.dtype}")
            return x, "bfloat16"
        for name, (dt, _, _) in DTYPES.items():
            if name != "bfloat16" and x.dtype == dt:
                return x, name
        raise FormatError(f"unsupported numpy dtype {x.dtype}")
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(x, torch.Tensor):
        raise FormatError(f"expected a numpy array or torch tensor, got {type(x).__name__}")
    if x.is_meta:
        raise FormatError("tensor is on the meta device and has no data")
    if x.layout != torch.strided:
        raise FormatError(f"{x.layout} tensors are not supported; convert it with .to_dense()")
    t = x.detach().cpu().contiguous()
    name = str(t.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise FormatError(f"unsupported tensor dtype {t.dtype}")
    if name == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16), name
    return t.numpy(), name


def contiguous(a: np.ndarray) -> np.ndarray:
    """``a`` as a C-contiguous array *of the same shape* (``np.ascontiguousarray`` turns a 0-d
    array into shape ``(1,)``, which would store a scalar with the wrong shape)."""
    return a if a.flags.c_contiguous else np.array(a, order="C")


def nonzero(a: np.ndarray, dtype_name: str) -> np.ndarray:
    """Numerically non-zero (so -0.0 counts as zero and NaN as non-zero), also for bf16 bits."""
    if dtype_name == "bfloat16":
        return (a & np.uint16(0x7FFF)) != 0
    return a != 0


def index_dtype(max_value: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds ``max_value``."""
    for dt in ("u1", "<u2", "<u4", "<u8"):
        if max_value <= np.iinfo(np.dtype(dt)).max:
            return np.dtype(dt)
    raise FormatError(f"index {max_value} does not fit in 64 bits")


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integers < 2**bits, ``bits`` each, little-endian bit order, into bytes."""
    v = values.astype(np.uint8 if bits <= 8 else np.uint64, copy=False).reshape(-1, 1)
    shifts = np.arange(bits, dtype=v.dtype)
    planes = ((v >> shifts) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` integers of ``bits`` bits each (int64)."""
    flat = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
    out = np.zeros(count, dtype=np.int64)
    for j in range(bits):  # one bit plane at a time: no int64 copy of all count * bits bits
        out |= flat[:, j].astype(np.int64) << j
    return out


# --------------------------------------------------------------------------- grouping
def nm_groups(a: np.ndarray, m: int) -> np.ndarray:
    """Groups of ``m`` consecutive elements along the input dimension, shape ``[G, m]``.

    Linear ``[out, in]``: row-major over ``[out, in/m]``; conv ``[out, in, *k]``: the axes are
    first ordered ``[out, *k, in]`` (grouped along ``c_in`` for each kernel position);
    1-D: consecutive elements. Same grouping as ``sparsetorch.patterns.NM``.
    """
    if a.ndim > 2:
        a = np.transpose(a, (0, *range(2, a.ndim), 1))
    return contiguous(a).reshape(-1, m)


def nm_ungroup(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`nm_groups`."""
    if len(shape) > 2:
        permuted = (shape[0], *shape[2:], shape[1])
        t = g.reshape(permuted)
        inv = (0, t.ndim - 1, *range(1, t.ndim - 1))
        return contiguous(np.transpose(t, inv))
    return g.reshape(shape)


def _input_dim(shape: tuple[int, ...]) -> int:
    return shape[1] if len(shape) >= 2 else shape[0]


# --------------------------------------------------------------------------- helpers
def _support(a: np.ndarray, dtype_name: str, mask: np.ndarray | None) -> np.ndarray:
    nz = nonzero(a, dtype_name)
    if mask is None:
        return nz
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != a.shape:
        raise FormatError(f"mask shape {mask.shape} differs from tensor shape {a.shape}")
    if bool((nz & ~mask).any()):
        raise FormatError("tensor has non-zero values where its mask says pruned; apply the mask first")
    return mask


def _check_part(parts: Mapping[str, np.ndarray], name: str, dtype: np.dtype | None = None,
                length: int | None = None) -> np.ndarray:
    if name not in parts:
        raise FormatError(f"missing part '{name}'")
    p = parts[name]
    if not isinstance(p, np.ndarray):
        raise FormatError(f"part '{name}' is not an array")
    if p.ndim != 1:
        raise FormatError(f"part '{name}' must be 1-D, has shape {p.shape}")
    if dtype is not None and p.dtype != dtype:
        raise FormatError(f"part '{name}' has dtype {p.dtype}, expected {dtype}")
    if length is not None and p.shape[0] != length:
        raise FormatError(f"part '{name}' has {p.shape[0]} entries, expected {length}")
    return p


def _check_index_part(parts: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    p = _check_part(parts, name)
    if p.dtype.kind != "u":
        raise FormatError(f"part '{name}' must be an unsigned integer array, has dtype {p.dtype}")
    return p


class StorageFormat:
    """Base class: ``compress`` a tensor into parts + params, ``decompress`` them back."""

    format: Format
    #: parts every tensor of this format has, and parts it may have
    required_parts: frozenset[str] = frozenset()
    optional_parts: frozenset[str] = frozenset()
    #: integer params written in the header (all required when non-empty)
    param_names: frozenset[str] = frozenset()

    def valid(self, a: np.ndarray, dtype_name: str, mask: np.ndarray | None = None,
              **params: Any) -> bool:
        """Whether ``compress`` can encode this tensor."""
        return True

    def compress(self, tensor: Any, mask: Any = None, dtype: str | None = None,
                 **params: Any) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """Encode ``tensor`` (numpy array or torch tensor); ``mask`` (True = kept) fixes the
        stored positions, otherwise the non-zeros are stored (numerically non-zero). ``dtype``
        names the dtype of a numpy array (needed only for bf16 bits). Returns ``(parts, params)``."""
        raise NotImplementedError

    def decompress(self, parts: Mapping[str, np.ndarray], shape: tuple[int, ...],
                   dtype_name: str, **params: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """Decode to ``(dense array, stored-position mask, or None for a dense tensor without a
        mask part)``."""
        raise NotImplementedError

    def size(self, parts: Mapping[str, np.ndarray]) -> int:
        """Bytes the parts take in the file."""
        return int(sum(p.nbytes for p in parts.values()))


def _mask_np(mask: Any) -> np.ndarray | None:
    if mask is None:
        return None
    if isinstance(mask, np.ndarray):
        return mask.astype(bool, copy=False)
    arr, _ = to_numpy(mask)
    return arr.astype(bool, copy=False)


def pack_mask(sup: np.ndarray) -> np.ndarray:
    """A boolean array as ``uint8[ceil(numel/8)]``: element ``i`` (C order) is bit ``i % 8``
    (least significant bit first) of byte ``i // 8``; padding bits are 0."""
    return np.packbits(np.asarray(sup, dtype=bool).reshape(-1), bitorder="little")


def unpack_mask(parts: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`pack_mask` for part ``name``, validating its length and padding bits."""
    numel = math.prod(shape)
    bits = _check_part(parts, name, np.dtype("u1"), (numel + 7) // 8)
    sup = np.unpackbits(bits, bitorder="little")
    if sup[numel:].any():
        raise FormatError(f"part '{name}' has set padding bits past the last element")
    return sup[:numel].astype(bool).reshape(shape)


class Dense(StorageFormat):
    """The tensor as it is; a masked tensor adds its mask as a packed ``mask`` part."""

    format = Format.DENSE
    required_parts = frozenset({"values"})
    optional_parts = frozenset({"mask"})

    def compress(self, tensor, mask=None, dtype=None, **params):
        a, name = to_numpy(tensor, dtype)
        parts = {"values": contiguous(a)}
        if mask is not None:
            parts["mask"] = pack_mask(_support(a, name, _mask_np(mask)))
        return parts, {}

    def decompress(self, parts, shape, dtype_name, **params):
        if "values" not in parts:
            raise FormatError("missing part 'values'")
        v = parts["values"]
        if v.dtype != DTYPES[dtype_name][0] or tuple(v.shape) != tuple(shape):
            raise FormatError(f"dense values have shape {v.shape} and dtype {v.dtype}, expected {tuple(shape)} {dtype_name}")
        sup = unpack_mask(parts, "mask", tuple(shape)) if "mask" in parts else None
        if sup is not None and bool((nonzero(v, dtype_name) & ~sup).any()):
            raise FormatError("dense values are non-zero where the mask part says pruned")
        return v, sup


class Bitmask(StorageFormat):
    """Packed bit mask over all elements + the stored values in C order."""

    format = Format.BITMASK
    required_parts = frozenset({"bitmask", "values"})

    def valid(self, a, dtype_name, mask=None, **params):
        return a.ndim >= 1 and dtype_name != "bool"

    def compress(self, tensor, mask=None, dtype=None, **params):
        a, name = to_numpy(tensor, dtype)
        if not self.valid(a, name):
            raise FormatError(f"bitmask needs a non-bool tensor with at least 1 dimension, got {a.shape} {name}")
        sup = _support(a, name, _mask_np(mask)).reshape(-1)
        return {
            "bitmask": pack_mask(sup),
            "values": contiguous(a.reshape(-1)[sup]),
        }, {}

    def decompress(self, parts, shape, dtype_name, **params):
        numel = math.prod(shape)
        sup = unpack_mask(parts, "bitmask", (numel,))
        nnz = int(sup.sum())
        vals = _check_part(parts, "values", DTYPES[dtype_name][0], nnz)
        out = np.zeros(numel, dtype=DTYPES[dtype_name][0])
        out[sup] = vals
        return out.reshape(shape), sup.reshape(shape)


def _csr_view(shape: tuple[int, ...]) -> tuple[int, int]:
    """``[R, C]``: ``[1, shape[0]]`` for 1-D, else ``[shape[0], prod(shape[1:])]`` (defined
    for ``R = 0`` too)."""
    if len(shape) < 1:
        raise FormatError("csr needs a tensor with at least 1 dimension")
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


class CSR(StorageFormat):
    """Compressed sparse rows over the 2-D view ``[shape[0], prod(shape[1:])]``."""

    format = Format.CSR
    required_parts = frozenset({"row_ptr", "col_idx", "values"})

    def valid(self, a, dtype_name, mask=None, **params):
        return a.ndim >= 1 and dtype_name != "bool"

    def compress(self, tensor, mask=None, dtype=None, **params):
        a, name = to_numpy(tensor, dtype)
        if not self.valid(a, name):
            raise FormatError(f"csr needs a non-bool tensor with at least 1 dimension, got {a.shape} {name}")
        rows, cols = _csr_view(a.shape)
        sup = _support(a, name, _mask_np(mask)).reshape(rows, cols)
        counts = sup.sum(axis=1, dtype=np.int64)
        nnz = int(counts.sum())
        row_ptr = np.zeros(rows + 1, dtype=np.int64)
        np.cumsum(counts, out=row_ptr[1:])
        _, col = np.nonzero(sup)
        return {
            "row_ptr": row_ptr.astype(index_dtype(nnz)),
            "col_idx": col.astype(index_dtype(max(cols - 1, 0))),
            "values": contiguous(a.reshape(rows, cols)[sup]),
        }, {}

    def decompress(self, parts, shape, dtype_name, **params):
        rows, cols = _csr_view(tuple(shape))
        row_ptr = _check_index_part(parts, "row_ptr")
        if row_ptr.shape[0] != rows + 1:
            raise FormatError(f"row_ptr has {row_ptr.shape[0]} entries, expected {rows + 1}")
        col = _check_index_part(parts, "col_idx")
        vals = _check_part(parts, "values", DTYPES[dtype_name][0], col.shape[0])
        if row_ptr.dtype == np.uint64 and row_ptr.size and int(row_ptr.max()) > np.iinfo(np.int64).max:
            raise FormatError("row_ptr value out of range")
        rp = row_ptr.astype(np.int64)
        if int(rp[0]) != 0 or int(rp[-1]) != col.shape[0]:
            raise FormatError(f"row_ptr must start at 0 and end at nnz={col.shape[0]}, got {int(rp[0])}..{int(rp[-1])}")
        counts = np.diff(rp)
        if (counts < 0).any():
            raise FormatError("row_ptr is not non-decreasing")
        if col.size and int(col.max()) >= cols:
            raise FormatError(f"column index {int(col.max())} out of range for {cols} columns")
        c = col.astype(np.int64)
        row_id = np.repeat(np.arange(rows, dtype=np.int64), counts)
        if c.size > 1 and not ((row_id[1:] != row_id[:-1]) | (c[1:] > c[:-1])).all():
            raise FormatError("column indices are not strictly increasing inside a row")
        out = np.zeros((rows, cols), dtype=DTYPES[dtype_name][0])
        sup = np.zeros((rows, cols), dtype=bool)
        out[row_id, c] = vals
        sup[row_id, c] = True
        return out.reshape(shape), sup.reshape(shape)


@functools.lru_cache(maxsize=64)
def nm_combinations(n: int, m: int) -> np.ndarray:
    """All ``n``-subsets of ``range(m)`` as ascending index tuples, in lexicographic order
    (the order of ``itertools.combinations``); row ``r`` is the subset with code ``r``."""
    table = np.array(list(itertools.combinations(range(m), n)), dtype=np.int64).reshape(-1, n)
    table.setflags(write=False)
    return table


@functools.lru_cache(maxsize=64)
def _nm_code_lookup(n: int, m: int) -> np.ndarray:
    combos = nm_combinations(n, m)
    lookup = np.full(1 << m, -1, dtype=np.int64)
    lookup[(np.int64(1) << combos).sum(axis=1)] = np.arange(len(combos))
    return lookup


class NMPacked(StorageFormat):
    """N stored values per group of M along the input dim + one packed code per group.

    The code of a group is the rank of its set of ``n`` stored positions among all
    ``n``-subsets of ``range(m)`` in lexicographic order (:func:`nm_combinations`), written
    with ``index_bits = max(1, bit_length(C(m, n) - 1))`` bits: 3 bits per group for 2:4
    (instead of 4 for two 2-bit indices or a 4-bit mask), 7 for 4:8, 2 for 1:4.
    """

    format = Format.NM
    required_parts = frozenset({"values", "indices"})
    param_names = frozenset({"n", "m", "index_bits"})
    #: largest M supported (the code table has 2**M entries)
    MAX_M = 16

    @staticmethod
    def index_bits(n: int, m: int) -> int:
        """Bits per group code: ``max(1, bit_length(C(m, n) - 1))``."""
        return max(1, (math.comb(m, n) - 1).bit_length())

    @classmethod
    def _check_nm(cls, n: Any, m: Any) -> tuple[int, int]:
        if type(n) is not int or type(m) is not int or not (0 < n < m <= cls.MAX_M):
            raise FormatError(f"n:m needs integers 0 < n < m <= {cls.MAX_M}, got n={n!r}, m={m!r}")
        return n, m

    def valid(self, a, dtype_name, mask=None, n=2, m=4, **params):
        if type(n) is not int or type(m) is not int or not (0 < n < m <= self.MAX_M) or a.ndim < 1 or dtype_name == "bool" or _input_dim(a.shape) % m:
            return False
        sup = _support(a, dtype_name, mask)
        return bool((nm_groups(sup, m).sum(axis=1) <= n).all())

    def compress(self, tensor, mask=None, dtype=None, n=2, m=4, **params):
        n, m = self._check_nm(n, m)
        a, name = to_numpy(tensor, dtype)
        if a.ndim < 1 or name == "bool" or _input_dim(a.shape) % m:
            raise FormatError(f"n:m with m={m} needs an input dimension divisible by {m}, got shape {a.shape}")
        sup = nm_groups(_support(a, name, _mask_np(mask)), m)
        counts = sup.sum(axis=1)
        if (counts > n).any():
            g = int(np.nonzero(counts > n)[0][0])
            raise FormatError(f"group {g} has {int(counts[g])} stored elements, more than n={n} of m={m}")
        # stored positions first, then the lowest unused positions as zero padding
        key = np.where(sup, 0, m) + np.arange(m)
        idx = np.sort(np.argsort(key, axis=1, kind="stable")[:, :n], axis=1)
        vals = np.take_along_axis(nm_groups(a, m), idx, axis=1)
        codes = _nm_code_lookup(n, m)[(np.int64(1) << idx).sum(axis=1)]
        bits = self.index_bits(n, m)
        return {"values": contiguous(vals.reshape(-1)), "indices": pack_bits(codes, bits)}, {
            "n": n, "m": m, "index_bits": bits}

    def decompress(self, parts, shape, dtype_name, n=None, m=None, index_bits=None, **params):
        n, m = self._check_nm(n, m)
        bits = self.index_bits(n, m)
        if index_bits != bits:
            raise FormatError(f"index_bits is {index_bits!r}, expected {bits} for {n}:{m}")
        if len(shape) < 1 or _input_dim(shape) % m:
            raise FormatError(f"shape {tuple(shape)} has an input dimension not divisible by m={m}")
        groups = math.prod(shape) // m
        vals = _check_part(parts, "values", DTYPES[dtype_name][0], groups * n)
        packed = _check_part(parts, "indices", np.dtype("u1"), (groups * bits + 7) // 8)
        if groups * bits % 8 and int(packed[-1]) >> (groups * bits % 8):
            raise FormatError("n:m indices have set padding bits past the last group code")
        codes = unpack_bits(packed, groups, bits)
        combos = nm_combinations(n, m)
        if codes.size and int(codes.max()) >= len(combos):
            raise FormatError(f"n:m group code {int(codes.max())} out of range (there are {len(combos)} {n}-of-{m} subsets)")
        idx = combos[codes]
        out = np.zeros((groups, m), dtype=DTYPES[dtype_name][0])
        sup = np.zeros((groups, m), dtype=bool)
        np.put_along_axis(out, idx, vals.reshape(groups, n), axis=1)
        np.put_along_axis(sup, idx, True, axis=1)
        return nm_ungroup(out, tuple(shape)), nm_ungroup(sup, tuple(shape))


FORMATS: dict[Format, StorageFormat] = {
    Format.DENSE: Dense(),
    Format.BITMASK: Bitmask(),
    Format.CSR: CSR(),
    Format.NM: NMPacked(),
}


def get_format(name: str | Format) -> StorageFormat:
    """The format class for a header name (``"dense"``, ``"bitmask"``, ``"csr"``, ``"n:m"``)."""
    try:
        return FORMATS[Format(name)]
    except ValueError:
        raise FormatError(
            f"unknown format {name!r}; known: {', '.join(f.value for f in Format)}"
        ) from None


# --------------------------------------------------------------------------- quantized values (version 3)
#: symmetric int8 values with one float32 scale per row (row = index along the first axis)
INT8_ROWS = "int8_symmetric_per_row"
#: quantization schemes a tensor entry may declare (format version >= 3)
QUANT_SCHEMES = (INT8_ROWS,)
#: logical dtypes a quantized tensor may have (what it decodes to)
QUANT_DTYPES = ("float32", "float16", "bfloat16")


def float32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 raw bits, rounding to nearest even (NaN kept as a quiet NaN)."""
    bits = np.ascontiguousarray(a, dtype="<f4").view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        rounded[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return rounded


def _as_float32(a: np.ndarray, dtype_name: str) -> np.ndarray:
    if dtype_name == "bfloat16":
        return (a.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return a.astype(np.float32)


def quantize_int8_rows(a: np.ndarray, dtype_name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(q int8, scales float32 [rows])`` for a 2-D float array: ``scale = max|row| / 127`` (1 for an
    all-zero row), ``q = clip(round_half_even(a / scale), -127, 127)``, computed in float64.
    Zeros stay exactly zero; NaN/Inf cannot be quantized (:class:`FormatError`)."""
    if a.ndim != 2 or dtype_name not in QUANT_DTYPES:
        raise FormatError(f"int8 quantization needs a 2-D float tensor, got {a.shape} {dtype_name}")
    f = _as_float32(a, dtype_name).astype(np.float64)
    if not np.isfinite(f).all():
        raise FormatError("cannot quantize a tensor holding NaN or Inf")
    amax = np.abs(f).max(axis=1) if f.shape[1] else np.zeros(f.shape[0])
    scales = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(f / scales.astype(np.float64)[:, None]), -127, 127).astype(np.int8)
    return q, scales


def dequantize_int8_rows(q: np.ndarray, scales: np.ndarray, dtype_name: str) -> np.ndarray:
    """``float32(q) * scales[row]`` in float32, then rounded (to nearest even) to ``dtype_name``
    (bfloat16 as raw bits). A pruned position (q = 0, scale > 0) decodes to +0.0."""
    if q.ndim != 2 or q.dtype != np.int8:
        raise FormatError(f"quantized values must decode to a 2-D int8 array, got {q.shape} {q.dtype}")
    if scales.dtype != np.dtype("<f4") or scales.shape != (q.shape[0],):
        raise FormatError(f"part 'scales' must be float32 with one entry per row ({q.shape[0]}), got {scales.shape} {scales.dtype}")
    if not (np.isfinite(scales).all() and (scales > 0).all()):
        raise FormatError("part 'scales' must hold finite positive numbers")
    f = q.astype(np.float32) * scales[:, None]
    if dtype_name == "float32":
        return f
    if dtype_name == "float16":
        return f.astype(np.float16)
    if dtype_name == "bfloat16":
        return float32_to_bf16_bits(f)
    raise FormatError(f"a quantized tensor decodes to float32, float16 or bfloat16, not {dtype_name}")
