"""Speedup planner: what would sparse kernels buy this model on this machine?"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .bench import device_sync
from .select import Timer
from .sparsify import (
    LayerChoice,
    decode_step_input,
    eligible_linears,
    layer_candidates,
    measure_layer,
)

__all__ = [
    "PlanReport",
    "plan",
    "NO_SPEEDUP_BELOW",
    "DecodeEstimate",
    "KernelCost",
    "MatrixCost",
    "decode_bytes_per_token",
    "decode_matrix_costs",
    "measure_kernel_costs",
    "MAX_WORKING_SET_BYTES",
    "decode_weight_seconds",
    "decode_weight_time",
    "kernel_kinds",
    "predict_decode_tokens_per_s",
    "measure_decode_overhead",
    "engine_decode_tokens_per_s",
    "decode_estimates",
    "DECODE_DTYPES",
]

#: value dtypes the decode estimate covers by default
DECODE_DTYPES = ("fp32", "fp16", "bf16", "int8")

#: end-to-end speedups under this are reported as "no speedup expected"
NO_SPEEDUP_BELOW = 1.05


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


@dataclass
class PlanReport:
    """Measured per-layer kernel times and the expected end-to-end effect of sparse kernels."""

    batch_size: int
    layers: list[LayerChoice] = field(default_factory=list)
    #: measured latency of one full forward of the dense model (None if no input was available)
    model_latency_s: float | None = None
    #: bytes of all parameters and buffers of the dense model
    model_bytes: int = 0
    threads: int = field(default_factory=torch.get_num_threads)
    #: predicted decode speed of the compiled DecodeEngine per weight dtype (batch 1 only)
    decode: list[DecodeEstimate] = field(default_factory=list)
    #: why there is no decode estimate (None when there is one or it was not asked for)
    decode_note: str | None = None

    # --- Linear layers
    @property
    def linear_dense_s(self) -> float:
        """Sum of measured dense times over the measured layers."""
        return sum(c.dense_time or 0.0 for c in self.layers)

    @property
    def linear_best_s(self) -> float:
        """Sum of the chosen kernel times over the measured layers."""
        return sum((c.best_time or c.dense_time or 0.0) for c in self.layers)

    @property
    def linear_speedup(self) -> float:
        return self.linear_dense_s / self.linear_best_s if self.linear_best_s else 1.0

    # --- end to end
    @property
    def expected_latency_s(self) -> float | None:
        """Dense model latency with the Linear time replaced by the best kernels' time."""
        if self.model_latency_s is None:
            return None
        other = max(self.model_latency_s - self.linear_dense_s, 0.0)
        return other + self.linear_best_s

    @property
    def expected_speedup(self) -> float:
        """End-to-end if the model latency was measured, else Linear layers only."""
        e = self.expected_latency_s
        if e is None or self.model_latency_s is None:
            return self.linear_speedup
        return self.model_latency_s / e if e else 1.0

    @property
    def sparse_bytes(self) -> int:
        """Model bytes with each sparse-kernel layer stored in its kernel's format."""
        saved = 0
        for c in self.layers:
            if c.kernel != "dense" and "dense" in c.nbytes and c.kernel in c.nbytes:
                saved += c.nbytes["dense"] - c.nbytes[c.kernel]
        return self.model_bytes - saved

    @property
    def model_sparsity(self) -> float:
        """Zeros / weights over all Linear layers."""
        n = sum(c.shape[0] * c.shape[1] for c in self.layers)
        z = sum(c.sparsity * c.shape[0] * c.shape[1] for c in self.layers)
        return z / n if n else 0.0

    @property
    def verdict(self) -> str:
        """One plain sentence."""
        s = self.expected_speedup
        scope = "end to end" if self.model_latency_s is not None else "over the Linear layers"
        if s < NO_SPEEDUP_BELOW:
            return (
                f"no speedup expected at batch {self.batch_size} on this machine "
                f"({s:.2f}x {scope}; sparse kernels do not beat dense here)"
            )
        return f"expected speedup {s:.2f}x {scope} at batch {self.batch_size}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "batch_size": self.batch_size,
            "threads": self.threads,
            "model_sparsity": self.model_sparsity,
            "model_latency_s": self.model_latency_s,
            "expected_latency_s": self.expected_latency_s,
            "expected_speedup": self.expected_speedup,
            "linear_dense_s": self.linear_dense_s,
            "linear_best_s": self.linear_best_s,
            "model_bytes": self.model_bytes,
            "sparse_bytes": self.sparse_bytes,
            "verdict": self.verdict,
            "decode": [d.to_dict() for d in self.decode],
            "decode_note": self.decode_note,
            "layers": [
                {"name": c.name, "shape": list(c.shape), "sparsity": c.sparsity, "kernel": c.kernel,
                 "times_s": c.times, "nbytes": c.nbytes, "skipped_reason": c.skipped_reason}
                for c in self.layers
            ],
        }

    def table(self, max_rows: int = 40) -> str:
        """Per-layer table: layers with the same shape, sparsity bucket and kernel merged into one
        row labelled by their layer kind (``self_attn.q_proj x30``); names and numbers are never cut."""
        from ..tables import format_table, layer_kind

        groups: dict[tuple, list[LayerChoice]] = {}
        for c in self.layers:
            key = (c.shape, round(c.sparsity, 2), c.kernel, c.skipped_reason)
            groups.setdefault(key, []).append(c)
        kernels = sorted({k for c in self.layers for k in c.times if k != "dense"})
        headers = ["layers", "shape", "sparsity", "dense us", *(f"{k} us" for k in kernels), "best", "speedup"]
        rows = []
        for (shape, sp, kern, reason), cs in list(groups.items())[:max_rows]:
            kinds = {layer_kind(c.name) for c in cs}
            if len(cs) == 1:
                label = cs[0].name
            elif len(kinds) == 1:
                label = f"{kinds.pop()} x{len(cs)}"
            else:
                label = f"{cs[0].name} (+{len(cs) - 1})"

            def med(k: str, cs: list[LayerChoice] = cs) -> str:
                vals = [c.times[k] for c in cs if k in c.times]
                return f"{statistics.median(vals) * 1e6:.1f}" if vals else "-"

            sp_cell = statistics.median(c.speedup for c in cs)
            rows.append([label, f"{shape[0]}x{shape[1]}", f"{sp:.0%}", med("dense"), *(med(k) for k in kernels),
                         kern if reason is None else "dense*", f"{sp_cell:.2f}x"])
        lines = format_table(headers, rows).splitlines()
        if len(groups) > max_rows:
            lines.append(f"... {len(groups) - max_rows} more groups")
        if any(c.skipped_reason for c in self.layers):
            lines.append("dense* = not measured (" + "; ".join(sorted({c.skipped_reason for c in self.layers if c.skipped_reason})) + ")")
        return "\n".join(lines)

    def __str__(self) -> str:
        lines = [
            f"sparse inference plan: batch {self.batch_size}, {self.threads} torch threads, "
            f"Linear sparsity {self.model_sparsity:.1%}",
            self.table(),
            "",
            f"Linear layers: dense {self.linear_dense_s * 1e3:.2f} ms -> best {self.linear_best_s * 1e3:.2f} ms "
            f"({self.linear_speedup:.2f}x)",
        ]
        if self.model_latency_s is not None and self.expected_latency_s is not None:
            lines.append(
                f"model forward: dense {self.model_latency_s * 1e3:.2f} ms -> expected "
                f"{self.expected_latency_s * 1e3:.2f} ms"
            )
        lines.append(f"memory: {_fmt_bytes(self.model_bytes)} dense -> {_fmt_bytes(self.sparse_bytes)} with sparse kernels")
        lines.append(self.verdict)
        if self.decode:
            d0 = self.decode[0]
            weights = (f"bytes per token / {d0.bandwidth_gb_per_s:.1f} GB/s streaming read" if d0.weight_s is None else
                       "per matrix its kernel's cost measured streaming through the model's bytes per token"
                       if d0.streamed else
                       f"per matrix the longer of streaming at {d0.bandwidth_gb_per_s:.1f} GB/s and in-cache compute")
            act = ("" if d0.activation_sparsity is None else
                   f", TEAL activation sparsity {d0.activation_sparsity:g} (thresholded matrices read only the "
                   "weights of live inputs where that is faster)")
            lines += ["", f"decode engine (sparsetorch generate), predicted: 1 / ({weights} + "
                          f"{d0.overhead_s * 1e3:.2f} ms per-token overhead), {d0.threads} threads{act}"]
            from ..tables import format_table

            rows = [[d.dtype if d.head_dtype == d.dtype else f"{d.dtype} (head {d.head_dtype})",
                     f"{d.bytes_per_token / 1e6:.1f}", f"{d.tokens_per_s:.1f}", f"{d.ceiling_tokens_per_s:.1f}",
                     "-" if d.measured_tokens_per_s is None else f"{d.measured_tokens_per_s:.1f}"] for d in self.decode]
            lines.append(format_table(["dtype", "MB/token", "tokens/s", "ceiling tokens/s", "measured"], rows))
        elif self.decode_note:
            lines.append(f"decode engine: no estimate ({self.decode_note})")
        return "\n".join(lines)


def _model_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def plan(
    model: nn.Module,
    batch_size: int = 1,
    *,
    min_sparsity: float = 0.3,
    kernels: Sequence[str] | None = None,
    timer: Timer | None = None,
    example_input: Callable[[], Any] | None = None,
    activation: Any = None,
    decode: bool = True,
    decode_bandwidth_gb_per_s: float | None = None,
    decode_overhead_s: float | None = None,
) -> PlanReport:
    """Measure every ``nn.Linear`` of ``model`` with each kernel and predict the speedup.

    Nothing in ``model`` changes. ``batch_size`` is the number of input rows per forward
    (tokens per step: 1 for token-by-token decode). Layers below ``min_sparsity`` are measured
    with ``dense`` only. The end-to-end estimate needs one forward of the model:
    ``example_input()`` is called for it (a Hugging Face causal LM gets a one-token decode
    step automatically); without one, only the Linear layers are estimated. ``activation``
    (:class:`~sparsetorch.activation.ActivationThresholds`): the thresholded layers are also
    measured with the kernels that skip zero inputs, on inputs with that sparsity (the model
    latency is measured without the thresholds).

    With ``decode`` (and ``batch_size == 1``), a model the compiled decode engine can run also
    gets :attr:`PlanReport.decode`: its predicted decode tokens/s per weight dtype
    (:func:`decode_estimates`; ``decode_bandwidth_gb_per_s`` and ``decode_overhead_s`` replace the
    measured bandwidth and overhead; TEAL ``activation`` thresholds are counted as the engine
    applies them, WINA ones are not, as the engine does not run them). Otherwise
    :attr:`PlanReport.decode_note` says why not.
    """
    report = PlanReport(batch_size=int(batch_size), model_bytes=_model_bytes(model))
    for name, lin, s, reason in eligible_linears(model, min_sparsity):
        cands, input_sparsity, reason = layer_candidates(name, lin, reason, kernels, activation)
        cands = ["dense"] if reason is not None else cands
        choice, _ = measure_layer(name, lin, s, batch_size, cands, timer, input_sparsity=input_sparsity)
        choice.skipped_reason = reason
        report.layers.append(choice)
    call = example_input or decode_step_input(model, batch_size)
    if call is not None:
        with torch.no_grad():
            if timer is not None:
                report.model_latency_s = float(timer("model", call))
            else:
                call()
                ts = []
                for _ in range(5):
                    device_sync()
                    t0 = time.perf_counter()
                    call()
                    device_sync()
                    ts.append(time.perf_counter() - t0)
                report.model_latency_s = statistics.median(ts)
    if decode and batch_size == 1:
        from ..errors import DependencyError, ModelError
        from .decode import decode_support

        reason = decode_support(model)
        if reason is None:
            teal = activation if getattr(activation, "criterion", None) == "teal" else None
            try:
                report.decode = decode_estimates(model, bandwidth_gb_per_s=decode_bandwidth_gb_per_s,
                                                 overhead_s=decode_overhead_s, activation=teal)
            except (ModelError, DependencyError) as exc:
                report.decode_note = str(exc)
        elif getattr(model, "config", None) is not None:
            report.decode_note = f"the decode engine cannot run this model: {reason}"
    return report


# ----------------------------------------------------------------------------- decode estimate
def predict_decode_tokens_per_s(bytes_per_token: float, bandwidth_gb_per_s: float, overhead_s: float = 0.0) -> float:
    """The planner's decode model: ``1 / (bytes_per_token / bandwidth + overhead_s)`` tokens/s.

    Decoding one token at batch 1 reads every weight once, so its time is the bytes read over the
    streaming bandwidth, plus a per-token ``overhead_s`` (everything that is not streaming the
    weights: norms, RoPE, attention, thread hand-offs, the Python loop, and kernels running below
    the streaming rate). With ``overhead_s = 0`` this is the bandwidth ceiling.
    """
    from ..errors import DataError

    if not bytes_per_token > 0 or not bandwidth_gb_per_s > 0 or not overhead_s >= 0:
        raise DataError(f"the decode estimate needs bytes_per_token > 0, bandwidth > 0 and overhead >= 0; got "
                        f"{bytes_per_token}, {bandwidth_gb_per_s} GB/s, {overhead_s} s.")
    return 1.0 / (bytes_per_token / (bandwidth_gb_per_s * 1e9) + overhead_s)


@dataclass(frozen=True)
class MatrixCost:
    """One matrix a :class:`~.decode.DecodeEngine` step reads once: how it is stored and how much."""

    name: str
    layout: str
    dtype: str
    #: bytes read: the packed matrix (values, masks, indices, scales) and its fp32 bias
    nbytes: int
    #: ``out * in``: the positions a bitmask kernel scans
    positions: int
    #: values stored (``positions`` for dense; the non-zeros for bitmask / CSR)
    stored: int
    #: fraction of the input at or above its activation threshold (1: no threshold); a
    #: thresholded matrix can run transposed, reading only that fraction (``DecodeEngine``)
    live: float = 1.0


def decode_matrix_costs(model: nn.Module, dtype: str = "fp32", *, head_dtype: str | None = None,
                        layout: str = "auto", activation: Any = None) -> list[MatrixCost]:
    """The matrices one :class:`~.decode.DecodeEngine` step on ``model`` reads, computed from the
    weights alone (no packing, no compiled extension): the LM head (dense, ``head_dtype``; a tied
    head is the embedding, counted once) and per layer the fused q/k/v, o, fused gate/up and down
    matrices in the layout the engine picks (:func:`~.lowbit.layout_for_counts` from their
    non-zeros) with their fp32 biases. With TEAL ``activation`` thresholds (as
    ``DecodeEngine.from_model(activation=...)`` takes them), each thresholded matrix's ``live`` is
    the calibrated fraction of its input at or above the threshold. Raises
    :class:`~sparsetorch.errors.ModelError` for a model the engine cannot run (or thresholds it
    cannot apply)."""
    from ..errors import ModelError
    from .decode import _check_options, _fused_levels, _fused_thresholds, _weight, decode_support
    from .lowbit import layout_for_counts, packed_nbytes

    head_dtype = _check_options(dtype, head_dtype, layout)
    reason = decode_support(model)
    if reason is not None:
        raise ModelError(f"the decode engine cannot run this model: {reason}.")
    base = model.model
    live: dict[str, float] = {}
    if activation is not None:
        layers = list(base.layers)
        thr = _fused_thresholds(model, layers, activation)
        live = {n: 1.0 - lv for n, lv in _fused_levels(model, layers, activation, list(thr)).items()}
    vocab, hidden = base.embed_tokens.weight.shape
    out = [MatrixCost("lm_head", "dense", head_dtype, packed_nbytes(vocab, hidden, vocab * hidden, "dense", head_dtype),
                      vocab * hidden, vocab * hidden)]
    groups = (("qkv", "self_attn", ("q_proj", "k_proj", "v_proj")), ("o", "self_attn", ("o_proj",)),
              ("gate_up", "mlp", ("gate_proj", "up_proj")), ("down", "mlp", ("down_proj",)))
    for i, layer in enumerate(base.layers):
        for key, parent, names in groups:
            mats = [_weight(getattr(getattr(layer, parent), n)) for n in names]
            rows = sum(w.shape[0] for w, _ in mats)
            inn = mats[0][0].shape[1]
            nnz = sum(int((w != 0).sum()) for w, _ in mats)
            lay = layout_for_counts(rows, inn, nnz, dtype) if layout == "auto" else layout
            bias = rows * 4 if any(b is not None for _, b in mats) else 0
            name = f"layers.{i}.{key}"
            out.append(MatrixCost(name, lay, dtype, packed_nbytes(rows, inn, nnz, lay, dtype) + bias,
                                  rows * inn, rows * inn if lay == "dense" else nnz, live.get(name, 1.0)))
    return out


def decode_bytes_per_token(model: nn.Module, dtype: str = "fp32", *, head_dtype: str | None = None,
                           layout: str = "auto") -> int:
    """Bytes of weights one :class:`~.decode.DecodeEngine` step reads for ``model`` in ``dtype``,
    computed from the weights alone (no packing, no compiled extension).

    The same count as ``DecodeEngine.from_model(model, dtype, head_dtype=..., layout=...)
    .weight_bytes_per_token``: the matrices of :func:`decode_matrix_costs`, one embedding row
    and the RMSNorm weights (fp32). Raises :class:`~sparsetorch.errors.ModelError` for a model
    the engine cannot run.
    """
    costs = decode_matrix_costs(model, dtype, head_dtype=head_dtype, layout=layout)
    return int(sum(c.nbytes for c in costs) + _rest_bytes(model, costs))


def _rest_bytes(model: nn.Module, costs: Sequence[MatrixCost]) -> int:
    """What a decode step reads beside the matrices of ``costs``: one embedding row (in the
    head's value dtype, ``costs[0]``) and the RMSNorm weights (fp32)."""
    from .lowbit import VALUE_DTYPES

    base = model.model
    hidden = base.embed_tokens.weight.shape[1]
    return hidden * VALUE_DTYPES[costs[0].dtype][1] + (2 * len(base.layers) + 1) * hidden * 4


def kernel_kinds(costs: Iterable[MatrixCost]) -> list[tuple[str, str]]:
    """The ``(layout, dtype)`` kernel costs (:func:`measure_kernel_costs`) a roofline over
    ``costs`` needs: each matrix's own, and the transposed ``LAYOUT-t`` one for a thresholded
    matrix (``live < 1``)."""
    kinds: set[tuple[str, str]] = set()
    for c in costs:
        kinds.add((c.layout, c.dtype))
        if c.live < 1.0:
            kinds.add((f"{c.layout}-t", c.dtype))
    return sorted(kinds)


@dataclass(frozen=True)
class KernelCost:
    """Time of one (layout, dtype) product at one token: ``per_position_s * positions +
    per_value_s * stored`` (a bitmask kernel scans every position's bit and multiplies every
    stored value; a dense one has only positions). Measured either with the weights in cache
    (the kernel's compute alone; ``working_set_bytes`` 0) or streamed through a working set of
    ``working_set_bytes`` (memory traffic included: the whole time of the product when a model of
    that many bytes per token is decoded)."""

    per_position_s: float
    per_value_s: float = 0.0
    #: bytes the measurement cycled through (0: one matrix, in cache)
    working_set_bytes: int = 0

    @property
    def streaming(self) -> bool:
        """Whether memory traffic is part of the cost (measured over a working set)."""
        return self.working_set_bytes > 0

    def seconds(self, m: MatrixCost) -> float:
        return self.per_position_s * m.positions + self.per_value_s * m.stored


#: the most bytes :func:`measure_kernel_costs` cycles through for one measured case
MAX_WORKING_SET_BYTES = 4 * 2**30


def measure_kernel_costs(kinds: Sequence[tuple[str, str]], *, rows: int = 1024, cols: int = 1024,
                         densities: tuple[float, float] = (0.3, 0.7), working_set_bytes: int = 0,
                         timer: Callable[[dict[str, Callable[[], object]]], dict[str, float]] | None = None,
                         ) -> dict[tuple[str, str], KernelCost]:
    """:class:`KernelCost` of each ``(layout, dtype)`` in ``kinds``, measured with the compiled
    one-token product (:func:`~.lowbit.lowbit_matmul`) on a random ``rows x cols`` matrix:
    dense once; bitmask and CSR at the two ``densities``, which separates the cost per position
    from the cost per stored value (both floored at 0). A layout ending in ``-t`` (``dense-t``,
    ``bitmask-t``, ``csr-t``) is the transposed activation kernel, timed with every input live:
    its cost per position and value of the rows it reads.

    ``working_set_bytes`` 0 times the matrix alone, small enough to stay in cache: the kernel's
    arithmetic and bookkeeping, not memory. The cost of the Python call (a 16 x 16 product, timed
    beside each kind) is taken off each product. A positive ``working_set_bytes`` (a model's bytes per
    token) cycles through copies of the packed matrix filling that many bytes, as decoding that
    model cycles through its weights: the time then includes the memory traffic at the bandwidth
    the caches give a working set of that size (a model of a few hundred MB partly fits a large
    last-level cache), and how well the kernel overlaps its loads with its arithmetic -- which a
    roofline of in-cache compute and one streaming bandwidth misses. The cases are measured one
    kind at a time, so at most two working sets are held at once (at most
    :data:`MAX_WORKING_SET_BYTES` each, and at most a quarter of the memory available when it
    starts: past the last-level cache a larger working set streams at the same rate; the
    :class:`KernelCost` records the size used).

    At torch's current thread count; ``timer`` maps ``{name: fn}`` to seconds per call (default
    :func:`~.bench.interleaved_medians`). Raises :class:`~sparsetorch.errors.DependencyError`
    when the extension cannot be built, :class:`~sparsetorch.errors.LimitError` for a
    ``working_set_bytes`` below 0 or above the limit."""
    from dataclasses import replace

    from ..errors import LimitError
    from .bench import interleaved_medians
    from .lowbit import lowbit_matmul, pack_lowbit

    if not 0 <= working_set_bytes <= MAX_WORKING_SET_BYTES:
        raise LimitError(f"working_set_bytes must be between 0 and {MAX_WORKING_SET_BYTES} "
                          f"({MAX_WORKING_SET_BYTES / 2**30:.0f} GiB); got {working_set_bytes}.")
    if not kinds:
        return {}
    if working_set_bytes:  # two working sets are held at once: keep them within half the free memory
        import psutil

        working_set_bytes = max(1, min(working_set_bytes, int(psutil.virtual_memory().available) // 4))
    timer = timer or (lambda fns: interleaved_medians(fns, repeats=15 if not working_set_bytes else 7, rounds=3))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, cols, generator=gen)
    weights = {d: torch.randn(rows, cols, generator=gen) * (torch.rand(rows, cols, generator=gen) < d)
               for d in (1.0, *densities)}
    positions = rows * cols
    x16, tiny = torch.randn(1, 16, generator=gen), pack_lowbit(torch.randn(16, 16, generator=gen), "dense", "fp32")
    out: dict[tuple[str, str], KernelCost] = {}
    for lay, dt in dict.fromkeys(kinds):
        base, trans = lay.removesuffix("-t"), lay.endswith("-t")
        fns: dict[str, Callable[[], object]] = {}
        pts: list[tuple[str, float, int]] = []
        for d in ((1.0,) if base == "dense" else densities):
            p = pack_lowbit(weights[d], base, dt, transposed=trans, threshold=0.0 if trans else None)
            if working_set_bytes:  # copies filling the working set, each read once per pass
                n = max(1, -(-working_set_bytes // max(1, p.nbytes)))
                packs = [p] + [replace(p, **{f: getattr(p, f).clone() for f in ("values", "masks", "cols",
                                                                                   "row_ptr", "scales")})
                               for _ in range(n - 1)]
            else:  # products per timed call: the Python call's own cost is small beside them
                n, packs = 8, [p] * 8
            key = f"{lay}/{dt}/{d}"
            fns[key] = lambda packs=packs: [lowbit_matmul(x, q, check=False) for q in packs]
            pts.append((key, d, n))
        # the Python call's own cost (a 16 x 16 product), timed beside them and taken off each
        # product: the engine calls its kernels from C++
        fns["call"] = lambda: [lowbit_matmul(x16, tiny, check=False) for _ in range(64)]
        times = timer(fns)
        call = times["call"] / 64
        secs = {k: max(0.0, times[k] / n - call) for k, _, n in pts}
        if len(pts) == 1:
            out[(lay, dt)] = KernelCost(secs[pts[0][0]] / positions, 0.0, working_set_bytes)
            continue
        (k1, d1, _), (k2, d2, _) = pts
        per_value = max(0.0, (secs[k2] - secs[k1]) / ((d2 - d1) * positions))
        per_position = max(0.0, (secs[k1] - per_value * d1 * positions) / positions)
        out[(lay, dt)] = KernelCost(per_position, per_value, working_set_bytes)
    return out


def decode_weight_seconds(costs: Sequence[MatrixCost], bandwidth_gb_per_s: float,
                          kernel_costs: dict[tuple[str, str], KernelCost] | None = None) -> float:
    """Seconds one decode step spends on its matrices, per matrix: its measured streaming
    :class:`KernelCost` (memory traffic included) where ``kernel_costs`` has one; for an in-cache
    cost a roofline, the longer of streaming its bytes at ``bandwidth_gb_per_s`` and its compute
    time. Without ``kernel_costs`` this is bytes over bandwidth.
    A matrix with live inputs below 1 takes the faster of its plain kernel and the transposed one
    (``LAYOUT-t`` costs), which reads only the live fraction: what ``activation_kernel="auto"``
    picks by measurement."""
    kc = kernel_costs or {}
    total = 0.0
    for m in costs:
        stream = m.nbytes / (bandwidth_gb_per_s * 1e9)
        t = _kernel_seconds(kc.get((m.layout, m.dtype)), m, stream)
        if m.live < 1.0:
            t = min(t, _kernel_seconds(kc.get((f"{m.layout}-t", m.dtype)), m, stream) * m.live)
        total += t
    return total


def _kernel_seconds(k: KernelCost | None, m: MatrixCost, stream_s: float) -> float:
    """One product's seconds: a streaming cost as measured; an in-cache cost as the longer of it and
    streaming the bytes (``stream_s``); bytes over bandwidth where no cost is known."""
    if k is None:
        return stream_s
    return k.seconds(m) if k.streaming else max(stream_s, k.seconds(m))


@dataclass
class DecodeEstimate:
    """Predicted decode speed of the :class:`~.decode.DecodeEngine` for one weight dtype."""

    dtype: str
    head_dtype: str
    bytes_per_token: int
    bandwidth_gb_per_s: float
    overhead_s: float
    threads: int = field(default_factory=torch.get_num_threads)
    #: the engine's measured tokens/s for this dtype, when it was the calibration run
    measured_tokens_per_s: float | None = None
    #: seconds per token on the weights by the per-matrix roofline (:func:`decode_weight_seconds`);
    #: None: bytes over bandwidth
    weight_s: float | None = None
    #: the TEAL activation sparsity the engine was estimated with (None: no thresholds)
    activation_sparsity: float | None = None
    #: ``weight_s`` came from kernel costs measured streaming through a working set
    #: (:func:`measure_kernel_costs`), not from a roofline of in-cache costs
    streamed: bool = False

    @property
    def tokens_per_s(self) -> float:
        """``1 / (weight_s + overhead_s)``; without ``weight_s``, :func:`predict_decode_tokens_per_s`."""
        if self.weight_s is None:
            return predict_decode_tokens_per_s(self.bytes_per_token, self.bandwidth_gb_per_s, self.overhead_s)
        return 1.0 / (self.weight_s + self.overhead_s)

    @property
    def ceiling_tokens_per_s(self) -> float:
        """Tokens/s if streaming the weights were the only cost (bandwidth / bytes per token)."""
        return self.bandwidth_gb_per_s * 1e9 / self.bytes_per_token

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "head_dtype": self.head_dtype, "bytes_per_token": self.bytes_per_token,
                "bandwidth_gb_per_s": self.bandwidth_gb_per_s, "overhead_s": self.overhead_s, "threads": self.threads,
                "predicted_tokens_per_s": self.tokens_per_s, "ceiling_tokens_per_s": self.ceiling_tokens_per_s,
                "measured_tokens_per_s": self.measured_tokens_per_s, "weight_s": self.weight_s,
                "activation_sparsity": self.activation_sparsity, "streamed": self.streamed}


def decode_weight_time(model: nn.Module, dtype: str, bandwidth_gb_per_s: float, *, head_dtype: str | None = None,
                       kernel_costs: dict[tuple[str, str], KernelCost] | None = None,
                       activation: Any = None, costs: Sequence[MatrixCost] | None = None) -> tuple[int, float]:
    """``(bytes_per_token, seconds)`` of one decode step's weight reads: the matrices by
    :func:`decode_weight_seconds` (with TEAL ``activation`` thresholds, thresholded matrices may
    read only their live inputs' weights), the rest (one embedding row, norms) streamed.
    ``bytes_per_token`` is what the weights take without thresholds. ``costs``: the model's
    :func:`decode_matrix_costs` for these arguments, when the caller has them (the weights are
    not scanned again)."""
    if costs is None:
        costs = decode_matrix_costs(model, dtype, head_dtype=head_dtype, activation=activation)
    rest = _rest_bytes(model, costs)
    nbytes = int(sum(c.nbytes for c in costs) + rest)
    return nbytes, decode_weight_seconds(costs, bandwidth_gb_per_s, kernel_costs) + rest / (bandwidth_gb_per_s * 1e9)


def engine_decode_tokens_per_s(engine: Any, ids: torch.Tensor, tokens: int = 16, repeats: int = 3) -> float:
    """Median greedy decode tokens/s of a :class:`~.decode.DecodeEngine` after prompt ``ids [1, T]``:
    per run, the new tokens after the first over the time from the first to the last (the prompt
    excluded, the Python loop included); one untimed warm-up run first."""
    engine.generate(ids, min(4, max(2, tokens)))  # warm-up: caches, RoPE tables, the thread pool
    rates = []
    for _ in range(max(1, repeats)):
        stamps: list[float] = []
        engine.generate(ids, max(2, tokens), on_token=lambda _t, st=stamps: st.append(time.perf_counter()))
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return statistics.median(rates)


def measure_decode_overhead(model: nn.Module, dtype: str = "fp32", *, tokens: int = 16, repeats: int = 3,
                            engine: Any = None) -> tuple[float, float]:
    """``(overhead_s, measured_tokens_per_s)`` of the engine on ``model`` in ``dtype``: the time
    of a decode step outside its matrix products (attention, norms, RoPE, activations, the
    Python loop and sampling), measured by the engine's own profile (``generate(profile=True)``):
    per run of ``tokens`` tokens after a one-token prompt (so every forward call is one row), the
    median wall time per token minus the matrix products' time per call; the median over
    ``repeats`` runs. Measured, not inferred as the residual of a whole step minus a model of its
    weights (a small difference of two large, noisy numbers). ``measured_tokens_per_s``:
    :func:`engine_decode_tokens_per_s`, unprofiled. Builds the engine unless ``engine`` is
    given; raises what :meth:`~.decode.DecodeEngine.from_model` raises."""
    from .decode import DecodeEngine

    eng = engine if engine is not None else DecodeEngine.from_model(model, dtype)
    one = torch.ones(1, 1, dtype=torch.int64)
    overheads = []
    for _ in range(max(1, repeats)):
        eng.generate(one, max(3, tokens), profile=True)
        st = eng.last_stats
        overheads.append(max(0.0, statistics.median(st.token_seconds) - st.linear_seconds / max(1, st.calls)))
    tps = engine_decode_tokens_per_s(eng, (torch.arange(1, 9) % int(eng.config["vocab"]))[None], tokens, repeats)
    return statistics.median(overheads), tps


def decode_estimates(
    model: nn.Module,
    dtypes: Sequence[str] = DECODE_DTYPES,
    *,
    head_dtype: str | None = None,
    bandwidth_gb_per_s: float | None = None,
    overhead_s: float | None = None,
    calibrate_dtype: str = "fp32",
    kernel_costs: dict[tuple[str, str], KernelCost] | None = None,
    activation: Any = None,
) -> list[DecodeEstimate]:
    """Predicted :class:`~.decode.DecodeEngine` decode tokens/s of ``model`` for each of ``dtypes``.

    Per token: the weights' time plus one per-token overhead. The weights' time is summed per
    matrix (:func:`decode_weight_seconds`) from each kernel's measured cost
    (:func:`measure_kernel_costs`, unless given): streamed through a working set the size of
    the model's bytes per token in that dtype, so the cost includes what memory and the caches
    give that working set and what the kernel's arithmetic adds (the 8-bit values of a sparse
    int8 model, a bitmask scanned at 70% sparsity are compute-bound). Unless both bandwidth and
    overhead are given (then the estimate is arithmetic only: bytes over bandwidth, or the
    ``kernel_costs`` given). The bandwidth (:func:`~.bench.streaming_bandwidth_gbs`; it times
    the bytes beside the matrices, and in-cache kernel costs) is measured unless given; the
    overhead (the step's time outside the matrix products) is measured once, by the engine's
    profile on the model in ``calibrate_dtype`` (:func:`measure_decode_overhead`), unless given,
    and used for every dtype. TEAL ``activation`` thresholds: the engine built with them
    (thresholded matrices read only their live inputs' weights when that is faster; the overhead
    is still measured without).
    """
    from .bench import streaming_bandwidth_gbs

    timing = bandwidth_gb_per_s is None or overhead_s is None
    bw = streaming_bandwidth_gbs() if bandwidth_gb_per_s is None else float(bandwidth_gb_per_s)
    costs = {dt: decode_matrix_costs(model, dt, head_dtype=head_dtype or dt, activation=activation) for dt in dtypes}
    if kernel_costs is None and timing:
        kernel_costs = {}
        for cs in costs.values():  # each dtype's kernels streamed through its own bytes
            todo = [k for k in kernel_kinds(cs) if k not in kernel_costs]
            kernel_costs.update(measure_kernel_costs(todo, working_set_bytes=min(
                MAX_WORKING_SET_BYTES, sum(c.nbytes for c in cs) + _rest_bytes(model, cs))))
    measured: dict[str, float] = {}
    if overhead_s is None:
        overhead_s, measured[calibrate_dtype] = measure_decode_overhead(model, calibrate_dtype)
    out = []
    for dt in dtypes:
        hd = head_dtype or dt
        nbytes, weight_s = decode_weight_time(model, dt, bw, kernel_costs=kernel_costs, costs=costs[dt])
        out.append(DecodeEstimate(dt, hd, nbytes, bw, float(overhead_s),
                                  measured_tokens_per_s=measured.get(dt) if hd == dt and activation is None else None,
                                  weight_s=weight_s if kernel_costs or activation is not None else None,
                                  activation_sparsity=None if activation is None else float(activation.sparsity),
                                  streamed=any(k.streaming for k in (kernel_costs or {}).values())))
    return out
