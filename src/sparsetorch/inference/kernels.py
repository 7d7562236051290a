"""Matmul kernels for a sparse ``nn.Linear`` weight: ``y = x @ W.T + b``.

Each kernel is a small stateless object with four verbs:

* ``available()`` - can it run in this process (compiled extension built, scipy installed, GPU)?
* ``supports(weight)`` - ``None`` if it can hold this weight, else the reason it cannot;
* ``pack(weight)`` - the weight in the kernel's format, a ``dict`` of tensors;
* ``matmul(x, packed, bias, out_features)`` - the product for a 2-D ``x``.

Kernels (``KERNELS`` maps name to instance):

==================  ===========================================================================
``dense``           ``F.linear`` on the dense weight (the baseline every choice is measured against)
``bitmask``         compiled: 1 bit per weight + fp32 non-zeros, AVX-512 ``vexpandps`` inner loop
``csr``             compiled: CSR with uint16 column indices (6 B per non-zero), batch-vectorised
``*_serial``        ``bitmask``/``csr`` on one thread: immune to waiting for a busy second core
``scipy``           ``scipy.sparse.csr_matrix`` (single-threaded; used when the compiler is missing)
``torch_csr``       ``torch.sparse_csr`` matmul (a baseline only; slow on CPU at small batch)
``semi_structured`` CUDA 2:4 ``torch.sparse.to_sparse_semi_structured`` (fp16/bf16, GPU only)
``colgather``       compiled: transposed dense weight, reads only the rows of non-zero inputs
                    (activation sparsity; offered only for layers with activation thresholds)
``<layout>_<dtype>`` compiled (:mod:`.lowbit`): ``dense``/``bitmask``/``csr`` with ``fp16``, ``bf16``
                    or ``int8`` values (per-row scales), fp32 accumulation. **Lossy** (the values
                    are rounded), so never chosen by ``kernel="auto"``; ask for one by name
                    (``SparseLinear.from_linear(lin, kernel="bitmask_fp16")``)
==================  ===========================================================================
"""

from __future__ import annotations

import os
import time
import warnings
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ext

__all__ = [
    "Kernel",
    "DenseKernel",
    "BitmaskKernel",
    "CSRKernel",
    "BitmaskSerialKernel",
    "CSRSerialKernel",
    "ScipyKernel",
    "TorchCSRKernel",
    "SemiStructuredKernel",
    "ColGatherKernel",
    "ColGatherSerialKernel",
    "ACTIVATION_KERNELS",
    "LowbitKernel",
    "LOWBIT_KERNELS",
    "KERNELS",
    "get_kernel",
    "auto_candidates",
    "machine_busy",
]

Packed = dict[str, Tensor]


class Kernel:
    """Base class: one way of storing a Linear weight and multiplying by it."""

    name: ClassVar[str] = "kernel"
    #: False only for ``dense``
    sparse: ClassVar[bool] = True

    def available(self) -> bool:
        """Whether the kernel can run in this process."""
        return True

    def supports(self, weight: Tensor) -> str | None:
        """``None`` if ``weight`` (2-D, ``[out, in]``) can be packed, else the reason why not."""
        if weight.dim() != 2:
            return "weight is not 2-D"
        return None

    def pack(self, weight: Tensor) -> Packed:
        """Convert a dense ``[out, in]`` weight into this kernel's tensors."""
        raise NotImplementedError

    def matmul(self, x: Tensor, packed: Packed, bias: Tensor | None, out_features: int) -> Tensor:
        """``x @ W.T + bias`` for a contiguous 2-D ``x`` of shape ``[batch, in]``."""
        raise NotImplementedError

    @staticmethod
    def nbytes(packed: Packed) -> int:
        """Bytes held by the packed weight (tensors only; cached helper objects are not counted)."""
        return sum(t.numel() * t.element_size() for t in packed.values() if isinstance(t, Tensor))


def _row_ptr(nnz_per_row: Tensor) -> Tensor:
    rp = torch.zeros(nnz_per_row.numel() + 1, dtype=torch.int64)
    rp[1:] = nnz_per_row.to(torch.int64).cumsum(0)
    return rp


def _cpu_fp32(weight: Tensor) -> str | None:
    if weight.dim() != 2:
        return "weight is not 2-D"
    if weight.device.type != "cpu":
        return "CPU kernel, weight is on " + weight.device.type
    if weight.dtype != torch.float32:
        return f"fp32 kernel, weight is {weight.dtype}"
    return None


class DenseKernel(Kernel):
    """``F.linear`` on the dense weight."""

    name = "dense"
    sparse = False

    def supports(self, weight: Tensor) -> str | None:
        return None

    def pack(self, weight: Tensor) -> Packed:
        return {"weight": weight.detach().contiguous()}

    def matmul(self, x: Tensor, packed: Packed, bias: Tensor | None, out_features: int) -> Tensor:
        return F.linear(x, packed["weight"], bias)


class _CompiledKernel(Kernel):
    """A kernel of the compiled extension: fp32 weights on the CPU, available once it builds."""

    #: run on one thread even when torch has more (robust on machines shared with other work)
    serial: ClassVar[bool] = False

    def available(self) -> bool:
        return _ext.get_extension() is not None

    def supports(self, weight: Tensor) -> str | None:
        return _cpu_fp32(weight)


class BitmaskKernel(_CompiledKernel):
    """Bit mask per 16 inputs (``int16 [out, ceil(in/16)]``) + packed fp32 non-zeros + row offsets."""

    name = "bitmask"

    def pack(self, weight: Tensor) -> Packed:
        w = weight.detach()
        out, inn = w.shape
        chunks = (inn + 15) // 16
        wp = torch.zeros(out, chunks * 16, dtype=w.dtype)
        wp[:, :inn] = w
        nz = wp != 0
        shifts = torch.arange(16, dtype=torch.int32)
        bits = (nz.view(out, chunks, 16).to(torch.int32) << shifts).sum(-1)
        # int32 -> int16 keeps the low 16 bits; the kernel reads them as uint16
        masks = torch.where(bits >= 32768, bits - 65536, bits).to(torch.int16).contiguous()
        return {"masks": masks, "values": wp[nz].contiguous(), "row_ptr": _row_ptr(nz.sum(1))}

    def matmul(self, x: Tensor, packed: Packed, bias: Tensor | None, out_features: int) -> Tensor:
        ext = _ext.get_extension()
        assert ext is not None, "bitmask kernel used without the compiled extension"
        return ext.bitmask_matmul(
            x, packed["masks"], packed["values"], packed["row_ptr"], bias, out_features, self.serial
        )


class CSRKernel(_CompiledKernel):
    """CSR: fp32 values, uint16 column indices (stored as int16), int64 row pointers."""

    name = "csr"

    def supports(self, weight: Tensor) -> str | None:
        reason = super().supports(weight)
        if reason is None and weight.shape[1] > 65536:
            reason = "more than 65536 input features (uint16 column index)"
        return reason

    def pack(self, weight: Tensor) -> Packed:
        w = weight.detach()
        nz = w != 0
        cols = nz.nonzero()[:, 1].to(torch.int32)
        cols = torch.where(cols >= 32768, cols - 65536, cols).to(torch.int16).contiguous()
        return {"values": w[nz].contiguous(), "cols": cols, "row_ptr": _row_ptr(nz.sum(1))}

    def matmul(self, x: Tensor, packed: Packed, bias: Tensor | None, out_features: int) -> Tensor:
        ext = _ext.get_extension()
        assert ext is not None, "csr kernel used without the compiled extension"
        return ext.csr_matmul(x, packed["values"], packed["cols"], packed["row_ptr"], bias, out_features, self.serial)


class BitmaskSerialKernel(BitmaskKernel):
    """``bitmask`` on one thread (wins when other processes keep the cores busy)."""

    name = "bitmask_serial"
    serial = True


class CSRSerialKernel(CSRKernel):
    """``csr`` on one thread (wins when other processes keep the cores busy)."""

    name = "csr_serial"
    serial = True


class ScipyKernel(Kernel):
    """``scipy.sparse.csr_matrix`` product (single-threaded); the fallback without a compiler."""

    name = "scipy"

    def available(self) -> bool:
        try:
            import scipy.sparse  # noqa: F401
        except ImportError:
            return False
        return True

    def supports(self, weight: Tensor) -> str | None:
        return _cpu_fp32(weight)

    def pack(self, weight: Tensor) -> Packed:
        w = weight.detach()
        nz = w != 0
        cols = nz.nonzero()[:, 1].to(torch.int32).contiguous()
        return {"values": w[nz].contiguous(), "cols": cols, "row_ptr": _row_ptr(nz.sum(1)).to(torch.int32)}

    def matmul(self, x: Tensor, packed: Packed, bias: Tensor | None, out_features: int) -> Tensor:
        import scipy.sparse as sp

        # scipy wraps the numpy views without copying; the matrix object is cached in the dict
        mat = packed.get("_scipy")  # type: ignore[assignment]
        if mat is None or not isinstance(mat, sp.csr_matrix):
            mat = sp.csr_matrix(
                (packed["values"].numpy(), packed["cols"].numpy(), packed["row_ptr"].numpy()),
                shape=(out_features, x.shape[1]),
            )
            packed["_scipy"] = mat  # type: ignore[assignment]
        xn = x.numpy()
        y = torch.from_numpy(mat @ xn[0]).unsqueeze(0) if x.shape[0] == 1 else torch.from_numpy((mat @ xn.T).T.copy())
        if bias is not None:
            y = y + bias
        return y


class TorchCSRKernel(Kernel):
    """``torch.sparse_csr_tensor`` matmul; a baseline, usually slower than dense on CPU."""

    name = "torch_csr"

    def supports(self, weight: Tensor) -> str | None:
        if weight.dim() != 2:
            return "weight is not 2-D"
        return None

    def pack(self, weight: Tensor) -> Packed:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            return {"weight": weight.detach().to_sparse_csr()}

    def matmul(self, x: Tensor, packed: Packed, bias: Tensor | None, out_features: int) -> Tensor:
        y = torch.mm(packed["weight"], x.t()).t()
        return y + bias if bias is not None else y

    @staticmethod
    def nbytes(packed: Packed) -> int:
        w = packed["weight"]
        return sum(t.numel() * t.element_size() for t in (w.values(), w.col_indices(), w.crow_indices()))


class SemiStructuredKernel(Kernel):
    """CUDA 2:4 semi-structured sparsity (``torch.sparse.to_sparse_semi_structured``)."""

    name = "semi_structured"

    def available(self) -> bool:
        return torch.cuda.is_available() and hasattr(torch.sparse, "to_sparse_semi_structured")

    def supports(self, weight: Tensor) -> str | None:
        if weight.dim() != 2:
            return "weight is not 2-D"
        if weight.device.type != "cuda":
            return "GPU kernel, weight is on " + weight.device.type
        if weight.dtype not in (torch.float16, torch.bfloat16):
            return f"needs fp16/bf16, weight is {weight.dtype}"
        from ..patterns import NM

        if NM(2, 4).violation(weight != 0) is not None:
            return "weight is not 2:4 sparse"
        return None

    def pack(self, weight: Tensor) -> Packed:
        return {"weight": torch.sparse.to_sparse_semi_structured(weight.detach().contiguous())}

    def matmul(self, x: Tensor, packed: Packed, bias: Tensor | None, out_features: int) -> Tensor:
        return F.linear(x, packed["weight"], bias)

    @staticmethod
    def nbytes(packed: Packed) -> int:
        w = packed["weight"]
        total = 0
        for attr in ("packed", "meta", "packed_t", "meta_t"):
            t = getattr(w, attr, None)
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
        return total


class ColGatherKernel(_CompiledKernel):
    """For activation-sparse inputs: the weight transposed (``[in, out]``, each input's weights
    contiguous) and, per input row, only the rows of live inputs are read. Live = non-zero, and
    at or above ``packed["threshold"]`` (times ``packed["scale"]`` for WINA) when those are set:
    ``sparsify_for_inference(activation=...)`` puts a layer's threshold there, so the layer needs
    no masking hook. Dense weights; the saving is in the activations."""

    name = "colgather"

    def pack(self, weight: Tensor) -> Packed:
        return {"wt": weight.detach().t().contiguous()}

    def matmul(self, x: Tensor, packed: Packed, bias: Tensor | None, out_features: int) -> Tensor:
        ext = _ext.get_extension()
        assert ext is not None, "colgather kernel used without the compiled extension"
        t = packed.get("threshold")
        return ext.colgather_matmul(x, packed["wt"], bias, 0.0 if t is None else float(t), packed.get("scale"),
                                    self.serial)


class ColGatherSerialKernel(ColGatherKernel):
    name = "colgather_serial"
    serial = True


class LowbitKernel(Kernel):
    """A weight in ``layout`` (dense / bitmask / csr) with ``dtype`` (fp16 / bf16 / int8) values,
    run by the decode extension's kernels (fp32 accumulation; see :mod:`.lowbit`). Lossy: the
    values are rounded when packed (pruned zeros stay exact)."""

    lossy: ClassVar[bool] = True

    def __init__(self, layout: str, dtype: str) -> None:
        self.layout, self.dtype = layout, dtype
        self.name = f"{layout}_{dtype}"  # type: ignore[misc]

    def available(self) -> bool:
        from ._decode_ext import get_decode_extension

        return get_decode_extension() is not None

    def supports(self, weight: Tensor) -> str | None:
        reason = _cpu_fp32(weight)
        if reason is None and self.layout == "csr" and weight.shape[1] > 65536:
            reason = "more than 65536 input features (uint16 column index)"
        return reason

    def pack(self, weight: Tensor) -> Packed:
        from .lowbit import pack_lowbit

        p = pack_lowbit(weight, self.layout, self.dtype)
        return {"values": p.values, "masks": p.masks, "cols": p.cols, "row_ptr": p.row_ptr, "scales": p.scales}

    def matmul(self, x: Tensor, packed: Packed, bias: Tensor | None, out_features: int) -> Tensor:
        from ._decode_ext import get_decode_extension
        from .lowbit import LAYOUTS, VALUE_DTYPES

        ext = get_decode_extension()
        assert ext is not None, f"{self.name} kernel used without the compiled decode extension"
        e = torch.empty(0)
        return ext.lowbit_matmul(x, LAYOUTS[self.layout], VALUE_DTYPES[self.dtype][0], out_features, packed["values"],
                                 packed.get("masks", e), packed.get("cols", e), packed.get("row_ptr", e),
                                 packed.get("scales", e), bias, False, False)


#: the lossy low-bit kernels, by name (explicit use only)
LOWBIT_KERNELS = tuple(f"{lay}_{dt}" for lay in ("dense", "bitmask", "csr") for dt in ("fp16", "bf16", "int8"))

#: kernels that pay off only when the *input* has many zeros (activation sparsity)
ACTIVATION_KERNELS = ("colgather", "colgather_serial")


KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in (
        DenseKernel(),
        BitmaskKernel(),
        CSRKernel(),
        BitmaskSerialKernel(),
        CSRSerialKernel(),
        ScipyKernel(),
        TorchCSRKernel(),
        SemiStructuredKernel(),
        ColGatherKernel(),
        ColGatherSerialKernel(),
        *(LowbitKernel(n.split("_")[0], n.split("_")[1]) for n in LOWBIT_KERNELS),
    )
}


def get_kernel(name: str) -> Kernel:
    """The kernel called ``name``; raises :class:`~sparsetorch.errors.MethodError` if unknown."""
    from ..errors import MethodError, close_matches

    try:
        return KERNELS[name]
    except KeyError:
        raise MethodError(
            f"unknown inference kernel {name!r}; choose one of {', '.join(KERNELS)}."
            + close_matches(name, KERNELS)
        ) from None


#: how long one measurement of other processes' CPU use is reused (it costs a sleep of BUSY_WINDOW_S)
BUSY_TTL_S = 10.0
BUSY_WINDOW_S = 0.2
_busy_cache: list[tuple[float, float | None]] = []


def _cpu_ticks() -> tuple[int, int]:
    """``(non-idle clock ticks of all CPUs, clock ticks used by this process)`` from Linux /proc."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    with open("/proc/self/stat") as f:
        own = f.read()
    fields = own[own.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 (state) onwards
    return sum(vals) - vals[3] - vals[4], int(fields[11]) + int(fields[12])  # utime + stime, all threads


def other_cpu_use(window_s: float = BUSY_WINDOW_S) -> float | None:
    """CPUs' worth of work done by *other* processes over a ``window_s`` sleep (Linux /proc:
    every CPU's non-idle ticks minus this process's); None where /proc is not readable.

    Why not the load average: it counts this process's own threads of the last minute, so a
    program that has just been computing (calibrating, pruning) looks like a busy machine to
    itself and is handed single-thread kernels on idle cores."""
    try:
        busy0, own0 = _cpu_ticks()
        t0 = time.monotonic()
        time.sleep(window_s)
        busy1, own1 = _cpu_ticks()
        elapsed = time.monotonic() - t0
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return max(0.0, ((busy1 - busy0) - (own1 - own0)) / hz / max(elapsed, 1e-9))


def machine_busy() -> bool:
    """True when other work keeps the cores busy: other processes use at least half a core more
    than the cores torch's threads leave free (``other_cpu_use() >= max(CPUs - threads, 0) + 0.5``,
    measured at most every ``BUSY_TTL_S`` seconds). Without /proc: the 1-minute load average
    ``>= CPUs - 0.5`` (which also counts this process).

    ``SPARSETORCH_PARALLEL=1`` forces False (always offer multi-threaded kernels), ``=0`` True.
    """
    env = os.environ.get("SPARSETORCH_PARALLEL")
    if env is not None and env != "":
        return env == "0"
    cpus = os.cpu_count() or 1
    now = time.monotonic()
    if not _busy_cache or now - _busy_cache[0][0] >= BUSY_TTL_S:
        _busy_cache[:] = [(now, other_cpu_use())]
    other = _busy_cache[0][1]
    if other is not None:
        return other >= max(cpus - torch.get_num_threads(), 0) + 0.5
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # pragma: no cover - Windows
        return False
    return load >= cpus - 0.5


def auto_candidates(device: torch.device | str = "cpu") -> list[str]:
    """Kernels tried by ``kernel="auto"`` on ``device`` (dense is always first).

    CPU: ``bitmask`` and ``csr`` (plus their ``_serial`` variants when torch uses several
    threads) when the compiled extension builds, else ``scipy``. On a busy machine (see
    :func:`machine_busy`) only the single-thread variants are offered: measured here, a
    parallel region in a model waits milliseconds for a core taken by another process, which
    an isolated measurement does not show (2-thread SmolLM2 decode got 4x slower than dense).
    CUDA: ``semi_structured``. ``torch_csr`` is never auto-selected (it is a baseline).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return ["dense", "semi_structured"]
    if _ext.get_extension() is not None:
        if torch.get_num_threads() > 1:
            if machine_busy():
                return ["dense", "bitmask_serial", "csr_serial"]
            return ["dense", "bitmask", "csr", "bitmask_serial", "csr_serial"]
        return ["dense", "bitmask", "csr"]
    return ["dense", "scipy"]
