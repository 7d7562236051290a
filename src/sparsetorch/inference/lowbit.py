"""Weights in fewer bytes: fp16 / bf16 / int8 values in the dense, bitmask and CSR layouts.

A packed weight is a ``dict`` of tensors (``values``, ``masks``, ``cols``, ``row_ptr``,
``scales``; absent parts are empty tensors) read by the compiled kernels of
:mod:`._decode_csrc`, which convert every value to fp32 in registers and accumulate in fp32.

* ``fp16`` / ``bf16``: the values rounded to the 16-bit type (round to nearest even).
* ``int8``: symmetric, one fp32 scale per output row, ``scale = max|w_row| / 127``,
  ``q = round(w / scale)``; the product is ``scale * sum(q * x)``.

In every layout the **sparsity pattern comes from the fp32 weight**: a pruned weight (an exact
zero) is never stored, so it stays exactly zero after any rounding. (A tiny surviving weight
may round to a stored zero in int8; that only ever adds zeros.)

Layouts (``in`` inputs, ``nnz`` non-zeros, ``b`` bytes per value):

=========== ======================================== ==========================================
``dense``   ``values [out, in]``                     ``out * in * b``
``bitmask`` ``masks int16 [out, ceil(in/16)]`` (bit  ``nnz * b + out * ceil(in/16) * 2 + 8 (out+1)``
            j of word c = input ``16c + j``), the
            non-zeros row-major, ``row_ptr int64``
``csr``     ``cols int16`` (uint16 bits), values,    ``nnz * (b + 2) + 8 (out+1)``
            ``row_ptr int64``
=========== ======================================== ==========================================

**Transposed** (``transposed=True``): the same layouts over ``W.T [in, out]`` (the stored rows are
the inputs; int8 scales stay one per output). At one input row the engine then reads only the
stored rows of the inputs that are non-zero -- the activation-sparse product (TEAL): with a
``threshold`` the inputs below it count as zero. Bytes: the table with ``out`` and ``in``
swapped (scales still ``out * 4``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import MethodError, ModelError, close_matches

__all__ = [
    "VALUE_DTYPES",
    "LAYOUTS",
    "LowbitWeight",
    "check_value_dtype",
    "quantize_int8",
    "pack_lowbit",
    "unpack_lowbit",
    "packed_nbytes",
    "choose_layout",
    "layout_for_counts",
    "lowbit_matmul",
]

#: value dtype name -> (code used by the C++ kernels, bytes per value)
VALUE_DTYPES: dict[str, tuple[int, int]] = {"fp32": (0, 4), "fp16": (1, 2), "bf16": (2, 2), "int8": (3, 1)}
#: layout name -> code used by the C++ kernels
LAYOUTS: dict[str, int] = {"dense": 0, "bitmask": 1, "csr": 2}

_TORCH_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
_EMPTY = torch.empty(0)


def check_value_dtype(dtype: str) -> str:
    """``dtype`` if it is one of :data:`VALUE_DTYPES`, else :class:`MethodError` naming the choices."""
    if dtype not in VALUE_DTYPES:
        raise MethodError(
            f"unknown weight dtype {dtype!r}; choose one of {', '.join(VALUE_DTYPES)}." + close_matches(dtype, VALUE_DTYPES)
        )
    return dtype


def _check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise MethodError(f"unknown weight layout {layout!r}; choose one of {', '.join(LAYOUTS)}." + close_matches(layout, LAYOUTS))
    return layout


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(q int8 [out, in], scales fp32 [out])``: symmetric per-output-row int8, zeros exact.

    ``scale = max|w_row| / 127`` (1.0 for an all-zero row), ``q = clamp(round(w / scale), -127, 127)``.
    Rounding is in float64 so the result does not depend on fp32 division order.
    """
    w = weight.detach().to(torch.float64)
    amax = w.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scales.to(torch.float32).contiguous()


def _row_ptr(nnz_per_row: Tensor) -> Tensor:
    rp = torch.zeros(nnz_per_row.numel() + 1, dtype=torch.int64)
    rp[1:] = nnz_per_row.to(torch.int64).cumsum(0)
    return rp


@dataclass
class LowbitWeight:
    """One packed weight: layout, value dtype, shape and the kernel's tensors."""

    layout: str
    dtype: str
    out_features: int
    in_features: int
    values: Tensor
    masks: Tensor = _EMPTY
    cols: Tensor = _EMPTY
    row_ptr: Tensor = _EMPTY
    scales: Tensor = _EMPTY
    #: the tensors hold ``W.T`` (rows = inputs): the activation-sparse product
    transposed: bool = False
    #: activation threshold on the input (TEAL ``|x_i| >= t`` kept), applied inside the kernel
    threshold: float | None = None

    def tensors(self) -> list[Tensor]:
        """``[values, masks, cols, row_ptr, scales]`` in the order the engine reads them."""
        return [self.values, self.masks, self.cols, self.row_ptr, self.scales]

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor of the packed weight."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def codes(self) -> tuple[int, int]:
        """``(layout code, dtype code)`` for the C++ kernels."""
        return LAYOUTS[self.layout], VALUE_DTYPES[self.dtype][0]


def pack_lowbit(weight: Tensor, layout: str = "bitmask", dtype: str = "fp32", *,
                mask: Tensor | None = None, transposed: bool = False, threshold: float | None = None) -> LowbitWeight:
    """Pack a 2-D ``[out, in]`` weight (any float dtype; read as fp32) into ``layout`` with ``dtype`` values.

    The stored positions are the weight's non-zeros before rounding (pruned zeros are never
    stored), or ``mask`` (bool ``[out, in]``, True = stored) when given -- e.g. the stored
    positions of a checkpoint, which keep a weight whose int8 value rounded to zero. The weight
    must be zero wherever ``mask`` is False. ``transposed`` stores ``W.T`` (see the module doc) and
    ``threshold`` (>= 0) is the input's activation threshold the kernel applies.
    """
    _check_layout(layout)
    check_value_dtype(dtype)
    if weight.dim() != 2:
        raise ModelError(f"pack_lowbit needs a 2-D [out, in] weight, got shape {tuple(weight.shape)}.")
    if threshold is not None and not (isinstance(threshold, (int, float)) and threshold >= 0):
        raise MethodError(f"an activation threshold must be a number >= 0, got {threshold!r}.")
    w = weight.detach().to("cpu", torch.float32)
    out, inn = w.shape
    if layout == "csr" and (out if transposed else inn) > 65536:
        raise ModelError("the csr layout holds at most 65536 stored columns (uint16 column index); use bitmask.")
    scales = _EMPTY
    if dtype == "int8":
        q, scales = quantize_int8(w)
        vals_full = q
    else:
        vals_full = w.to(_TORCH_DTYPE[dtype])
    extra = {"transposed": bool(transposed), "threshold": None if threshold is None else float(threshold)}
    if layout == "dense":
        vals = vals_full.t() if transposed else vals_full
        return LowbitWeight(layout, dtype, out, inn, vals.contiguous(), scales=scales, **extra)
    if mask is None:
        nz = w != 0
    else:
        nz = mask.to("cpu", torch.bool)
        if tuple(nz.shape) != (out, inn):
            raise ModelError(f"pack_lowbit: mask shape {tuple(nz.shape)} differs from the weight's {(out, inn)}.")
        if bool((w[~nz] != 0).any()):
            raise ModelError("pack_lowbit: the weight is non-zero where the mask says pruned; apply the mask first.")
    rows, ncols = (inn, out) if transposed else (out, inn)  # the stored matrix
    if transposed:
        nz, vals_full = nz.t(), vals_full.t()
    if layout == "bitmask":
        chunks = (ncols + 15) // 16
        nzp = torch.zeros(rows, chunks * 16, dtype=torch.bool)
        nzp[:, :ncols] = nz
        shifts = torch.arange(16, dtype=torch.int32)
        bits = (nzp.view(rows, chunks, 16).to(torch.int32) << shifts).sum(-1)
        masks = torch.where(bits >= 32768, bits - 65536, bits).to(torch.int16).contiguous()
        return LowbitWeight(layout, dtype, out, inn, vals_full[nz].contiguous(), masks=masks,
                            row_ptr=_row_ptr(nz.sum(1)), scales=scales, **extra)
    cols = nz.nonzero()[:, 1].to(torch.int32)
    cols = torch.where(cols >= 32768, cols - 65536, cols).to(torch.int16).contiguous()
    return LowbitWeight(layout, dtype, out, inn, vals_full[nz].contiguous(), cols=cols,
                        row_ptr=_row_ptr(nz.sum(1)), scales=scales, **extra)


def unpack_lowbit(p: LowbitWeight) -> Tensor:
    """The dense fp32 ``[out, in]`` weight a packed one stands for (values times scales)."""
    vals = p.values.to(torch.float32)
    nr, nc = (p.in_features, p.out_features) if p.transposed else (p.out_features, p.in_features)
    if p.layout == "dense":
        w = vals.view(nr, nc).clone()
    else:
        w = torch.zeros(nr, nc, dtype=torch.float32)
        rows = torch.repeat_interleave(torch.arange(nr), p.row_ptr.diff())
        if p.layout == "bitmask":
            chunks = (nc + 15) // 16
            bits = (p.masks.to(torch.int32) & 0xFFFF)[:, :, None] >> torch.arange(16, dtype=torch.int32)
            nz = (bits & 1).bool().view(nr, chunks * 16)[:, :nc]
            w[nz] = vals
        else:
            cols = p.cols.to(torch.int64) & 0xFFFF
            w[rows, cols] = vals
    if p.transposed:
        w = w.t().contiguous()
    if p.dtype == "int8":
        w *= p.scales[:, None]
    return w


def packed_nbytes(out: int, inn: int, nnz: int, layout: str, dtype: str) -> int:
    """Bytes of a packed weight without packing it (see the table in the module docstring)."""
    b = VALUE_DTYPES[dtype][1]
    scales = out * 4 if dtype == "int8" else 0
    if layout == "dense":
        return out * inn * b + scales
    if layout == "bitmask":
        return nnz * b + out * ((inn + 15) // 16) * 2 + 8 * (out + 1) + scales
    return nnz * (b + 2) + 8 * (out + 1) + scales


def layout_for_counts(out: int, inn: int, nnz: int, dtype: str, min_saving: float = 0.1) -> str:
    """:func:`choose_layout` from the counts alone: an ``[out, inn]`` weight with ``nnz`` stored values."""
    dense = packed_nbytes(out, inn, nnz, "dense", dtype)
    best = min(("bitmask", "csr"), key=lambda lay: packed_nbytes(out, inn, nnz, lay, dtype))
    return best if packed_nbytes(out, inn, nnz, best, dtype) <= dense * (1.0 - min_saving) else "dense"


def choose_layout(weight: Tensor, dtype: str, min_saving: float = 0.1, *, mask: Tensor | None = None) -> str:
    """The layout that reads the fewest bytes per product, ``dense`` unless a sparse one saves
    at least ``min_saving`` of dense's bytes (decode at batch 1 is bound by memory traffic, and
    expanding packed values costs a little compute, so a near-tie stays dense). ``mask`` (True =
    stored) counts the stored positions instead of the non-zeros (see :func:`pack_lowbit`)."""
    out, inn = weight.shape
    nnz = int(mask.sum()) if mask is not None else int((weight != 0).sum())
    return layout_for_counts(out, inn, nnz, dtype, min_saving)


def lowbit_matmul(x: Tensor, p: LowbitWeight, bias: Tensor | None = None, *, serial: bool = False,
                  check: bool = True) -> Tensor:
    """``x @ W.T + bias`` for a contiguous fp32 ``x [B, in]`` with the compiled kernels (fp32 accumulation).

    Raises :class:`~sparsetorch.errors.DependencyError` when the extension cannot be built.
    """
    from ..errors import DependencyError
    from ._decode_ext import decode_extension_error, get_decode_extension

    ext = get_decode_extension()
    if ext is None:
        raise DependencyError(
            "the compiled low-bit kernels are unavailable (" + str(decode_extension_error())
            + "); install a C++ compiler (g++) or use fp32 dense weights."
        )
    fmt, dt = p.codes()
    thr = -1.0 if p.threshold is None else float(p.threshold)
    return ext.lowbit_matmul(x.contiguous(), fmt, dt, p.out_features, p.values, p.masks, p.cols, p.row_ptr,
                             p.scales, bias, serial, check, p.transposed, thr)
