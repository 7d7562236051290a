"""A compressed checkpoint's stored parts read straight into the decode engine's layouts.

The checkpoint format (``docs/format.md``) and the engine's packed weights
(:mod:`.lowbit`) were made to agree where they can:

=================================== ============================================================
engine layout (value dtype ``d``)   stored tensors read as they are (every member of a fused matrix)
=================================== ============================================================
``dense``                           ``dense`` values of dtype ``d``; ``int8``: quantized values
                                    + ``scales``
``bitmask``                         ``bitmask`` (input features a multiple of 16: the file's bit
                                    mask, 8 bits per byte in C order, *is* the engine's uint16 per
                                    16 inputs) or ``n:m`` (each group's code gives its positions);
                                    the values in C order; ``row_ptr`` from the bit counts
``csr``                             ``csr``: the values, ``col_idx`` and ``row_ptr`` cast to the
                                    engine's index types
=================================== ============================================================

Value dtypes match when the stored tensor is quantized (``int8_symmetric_per_row``) and the
engine runs ``int8``, or it is plain float32 / float16 / bfloat16 and the engine runs fp32 /
fp16 / bf16. Anything else (another layout, another value dtype, unaligned rows) is *repacked*:
the tensors are decoded and packed by :func:`~.lowbit.pack_lowbit` with the stored positions as
the pattern -- which gives the same bytes the direct path would, where both apply.

The layout of each fused matrix is the one :meth:`DecodeEngine.from_model` would choose
(:func:`~.lowbit.layout_for_counts` over the stored positions), so reading directly never
changes what runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .lowbit import LowbitWeight, layout_for_counts, pack_lowbit

__all__ = ["MatrixSource", "engine_value_dtype", "stored_count", "read_matrix"]

#: logical (header) dtype -> engine value dtype, for plain float tensors
_ENGINE_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_NP_VALUES = {"fp32": np.dtype("<f4"), "fp16": np.dtype("<f2"), "bf16": np.dtype("<u2"), "int8": np.dtype("i1")}


@dataclass
class MatrixSource:
    """How one fused matrix was built: ``direct`` or ``repacked`` (with the reason)."""

    name: str
    how: str
    reason: str | None = None


def engine_value_dtype(info: Any) -> str | None:
    """The engine value dtype a stored tensor's values already are (None: none of them)."""
    if info.quantization is not None:
        return "int8"
    return _ENGINE_DTYPE.get(info.dtype)


def _torch(a: np.ndarray, dt: str) -> Tensor:
    """A writable torch copy of stored values in the engine's value dtype (bf16 from its bits)."""
    a = np.array(a, copy=True)
    if dt == "bf16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def stored_count(ck: Any, info: Any) -> int:
    """Stored positions of a tensor without decoding it (the mask's count, or the non-zeros of an
    unmasked dense tensor)."""
    fmt = info.format.value
    if fmt in ("bitmask", "n:m"):
        return int(ck.raw(info.parts["values"]).shape[0])
    if fmt == "csr":
        return int(ck.raw(info.parts["col_idx"]).shape[0])
    if "mask" in info.parts:
        return int(np.unpackbits(ck.raw(info.parts["mask"]), count=info.numel).sum())
    from ..export.formats import nonzero

    return int(nonzero(ck.raw(info.parts["values"]), "int8" if info.quantization else info.dtype).sum())


def _mask_words(bits: np.ndarray, out: int, inn: int) -> np.ndarray:
    """A C-order bit mask over ``[out, inn]`` (``inn % 16 == 0``) as the engine's int16 words."""
    return np.ascontiguousarray(bits[: out * inn // 8]).view("<i2").reshape(out, inn // 16)


def _row_ptr(counts: np.ndarray) -> Tensor:
    rp = np.zeros(counts.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=rp[1:])
    return torch.from_numpy(rp)


def _direct(ck: Any, infos: list[Any], layout: str, dtype: str) -> LowbitWeight | str:
    """The fused matrix from the stored parts as they are, or the reason it cannot be."""
    from ..export.formats import NMPacked, nm_combinations, unpack_bits

    for info in infos:
        have = engine_value_dtype(info)
        if have != dtype:
            return f"stored as {'int8' if info.quantization else info.dtype}, the engine runs {dtype}"
        if len(info.shape) != 2:
            return "not 2-D"
    inn = infos[0].shape[1]
    out = sum(i.shape[0] for i in infos)
    fmts = {i.format.value for i in infos}
    scales = (torch.from_numpy(np.concatenate([np.array(ck.raw(i.parts["scales"]), dtype="<f4") for i in infos]))
              if dtype == "int8" else torch.empty(0))
    npdt = _NP_VALUES[dtype]
    vals = [ck.raw(i.parts["values"]) for i in infos]
    if any(v.dtype != npdt for v in vals):
        return "stored values are not in the engine's value type"
    if layout == "dense":
        if fmts != {"dense"}:
            return f"stored as {'/'.join(sorted(fmts))}, the engine reads dense"
        values = _torch(np.concatenate([v.reshape(-1) for v in vals]), dtype).view(out, inn)
        return LowbitWeight("dense", dtype, out, inn, values.contiguous(), scales=scales)
    values = _torch(np.concatenate(vals), dtype)
    if layout == "bitmask":
        if inn % 16:
            return f"{inn} input features are not a multiple of 16 (the stored bit rows do not align)"
        words = []
        for info in infos:
            rows = info.shape[0]
            if info.format.value == "bitmask":
                words.append(_mask_words(ck.raw(info.parts["bitmask"]), rows, inn))
            elif info.format.value == "n:m":
                n, m = info.params["n"], info.params["m"]
                groups = rows * inn // m
                codes = unpack_bits(ck.raw(info.parts["indices"]), groups, NMPacked.index_bits(n, m))
                combos = nm_combinations(n, m)
                if codes.size and int(codes.max()) >= len(combos):
                    return "an n:m group code is out of range"
                sup = np.zeros((groups, m), dtype=bool)
                np.put_along_axis(sup, combos[codes], True, axis=1)
                words.append(_mask_words(np.packbits(sup.reshape(-1), bitorder="little"), rows, inn))
            else:
                return f"stored as {info.format.value}, the engine reads bitmask"
        masks = np.concatenate(words)
        counts = np.unpackbits(masks.view(np.uint8).reshape(out, -1), axis=1).sum(1)
        if int(counts.sum()) != values.numel():
            return "the stored bit mask and values disagree"
        return LowbitWeight("bitmask", dtype, out, inn, values, masks=torch.from_numpy(masks.copy()),
                            row_ptr=_row_ptr(counts), scales=scales)
    if fmts != {"csr"}:
        return f"stored as {'/'.join(sorted(fmts))}, the engine reads csr"
    cols = np.concatenate([ck.raw(i.parts["col_idx"]).astype(np.int64) for i in infos])
    counts = np.concatenate([np.diff(ck.raw(i.parts["row_ptr"]).astype(np.int64)) for i in infos])
    if cols.size and (int(cols.max()) >= inn or int(cols.min()) < 0):
        return "stored column index out of range"
    cols16 = torch.from_numpy(np.where(cols >= 32768, cols - 65536, cols).astype(np.int16))
    return LowbitWeight("csr", dtype, out, inn, values, cols=cols16, row_ptr=_row_ptr(counts), scales=scales)


def _decoded(ck: Any, name: str) -> tuple[Tensor, Tensor]:
    """A stored tensor decoded to float32, and its stored positions (the non-zeros if unmasked)."""
    from ..errors import CheckpointError
    from ..export import reader

    try:
        arr, sup = ck.get(name, bf16="float32")
    except reader.ReadError as exc:
        raise CheckpointError(f"{exc}. The file is corrupt; re-export it.") from None
    w = torch.from_numpy(np.array(arr, dtype=np.float32))
    return w, (torch.from_numpy(np.array(sup, dtype=bool)) if sup is not None else w != 0)


def read_matrix(ck: Any, names: list[str], dtype: str, layout: str = "auto", *,
                direct: bool = True) -> tuple[LowbitWeight, str, MatrixSource]:
    """Members ``names`` (stored tensors, fused by rows) as one packed weight for the engine.

    Returns ``(packed, layout, source)``; the layout is the one the engine would choose over the
    stored positions (``layout="auto"``) or ``layout``. With ``direct`` the stored parts are read
    as they are when they match (see the module docstring); otherwise, or when they do not, the
    members are decoded and packed with their stored positions (``source.how == "repacked"``).
    """
    infos = [ck.info(n) for n in names]
    out = sum(i.shape[0] for i in infos)
    inn = infos[0].shape[1]
    nnz = sum(stored_count(ck, i) for i in infos)
    lay = layout_for_counts(out, inn, nnz, dtype) if layout == "auto" else layout
    reason = "direct reading turned off"
    if direct:
        got = _direct(ck, infos, lay, dtype)
        if isinstance(got, LowbitWeight):
            return got, lay, MatrixSource(names[0], "direct")
        reason = got
    mats = [_decoded(ck, n) for n in names]
    w = torch.cat([m[0] for m in mats]) if len(mats) > 1 else mats[0][0]
    mask = torch.cat([m[1] for m in mats]) if len(mats) > 1 else mats[0][1]
    return pack_lowbit(w, lay, dtype, mask=mask), lay, MatrixSource(names[0], "repacked", reason)
