"""Speedup planner: what would sparse kernels buy this model on this machine?"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
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

__all__ = ["PlanReport", "plan", "NO_SPEEDUP_BELOW"]

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
    return report
