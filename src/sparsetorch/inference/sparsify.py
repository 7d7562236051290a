"""``sparsify_for_inference``: swap eligible ``nn.Linear`` layers for the fastest kernel."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .linear import SparseLinear
from .select import Selection, Timer, select_kernel

__all__ = ["LayerChoice", "SparsifyReport", "sparsify_for_inference", "eligible_linears", "weight_sparsity"]


def weight_sparsity(weight: torch.Tensor) -> float:
    """Fraction of exact zeros in ``weight``."""
    n = weight.numel()
    return float((weight == 0).sum().item()) / n if n else 0.0


def _shared_param_ids(model: nn.Module) -> set[int]:
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {pid for pid, c in counts.items() if c > 1}


def eligible_linears(model: nn.Module, min_sparsity: float = 0.0) -> Iterator[tuple[str, nn.Linear, float, str | None]]:
    """Yield ``(name, linear, sparsity, reason_skipped)`` for every ``nn.Linear`` of ``model``.

    ``reason_skipped`` is None for a layer that may be replaced. Layers are skipped when their
    weight is shared with another module (tied embeddings), when they live inside
    ``nn.MultiheadAttention`` (which reads ``.weight`` directly), or when their sparsity is
    below ``min_sparsity``.
    """
    shared = _shared_param_ids(model)
    mha_children = {
        id(m) for parent in model.modules() if isinstance(parent, nn.MultiheadAttention) for m in parent.modules()
    }
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        s = weight_sparsity(mod.weight.detach())
        reason = None
        if id(mod.weight) in shared:
            reason = "weight shared with another module"
        elif id(mod) in mha_children:
            reason = "inside nn.MultiheadAttention"
        elif s < min_sparsity:
            reason = f"sparsity {s:.0%} < min_sparsity {min_sparsity:.0%}"
        yield name, mod, s, reason


@dataclass
class LayerChoice:
    """What happened to one ``nn.Linear``."""

    name: str
    shape: tuple[int, int]
    sparsity: float
    kernel: str
    times: dict[str, float] = field(default_factory=dict)
    nbytes: dict[str, int] = field(default_factory=dict)
    skipped_reason: str | None = None

    @property
    def dense_time(self) -> float | None:
        return self.times.get("dense")

    @property
    def best_time(self) -> float | None:
        return self.times.get(self.kernel)

    @property
    def speedup(self) -> float:
        d, b = self.dense_time, self.best_time
        return d / b if d and b else 1.0


@dataclass
class SparsifyReport:
    """Per-layer kernel choices of :func:`sparsify_for_inference`."""

    batch_size: int
    layers: list[LayerChoice] = field(default_factory=list)

    @property
    def replaced(self) -> list[LayerChoice]:
        """Layers now running a sparse kernel."""
        return [c for c in self.layers if c.kernel != "dense" and c.skipped_reason is None]

    @property
    def linear_speedup(self) -> float:
        """Sum of dense times / sum of chosen times over the measured layers."""
        meas = [c for c in self.layers if c.dense_time and c.best_time]
        d = sum(c.dense_time for c in meas)  # type: ignore[misc]
        b = sum(c.best_time for c in meas)  # type: ignore[misc]
        return d / b if b else 1.0

    def kernel_counts(self) -> dict[str, int]:
        """How many layers use each kernel (skipped layers count as dense)."""
        return dict(Counter(c.kernel for c in self.layers))

    def to_dict(self) -> dict:
        """JSON-ready summary."""
        return {
            "batch_size": self.batch_size,
            "linear_speedup": self.linear_speedup,
            "kernel_counts": self.kernel_counts(),
            "layers": [
                {
                    "name": c.name,
                    "shape": list(c.shape),
                    "sparsity": c.sparsity,
                    "kernel": c.kernel,
                    "times_s": c.times,
                    "nbytes": c.nbytes,
                    "skipped_reason": c.skipped_reason,
                }
                for c in self.layers
            ],
        }

    def __str__(self) -> str:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.kernel_counts().items()))
        return (
            f"sparsify_for_inference (batch {self.batch_size}): {len(self.replaced)}/{len(self.layers)} "
            f"Linear layers on a sparse kernel ({counts}); measured Linear speedup "
            f"{self.linear_speedup:.2f}x"
        )


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def measure_layer(
    name: str, linear: nn.Linear, sparsity: float, batch_size: int, kernels: Sequence[str] | None, timer: Timer | None
) -> tuple[LayerChoice, Selection]:
    """Run :func:`select_kernel` on one layer and describe the result."""
    w = linear.weight.detach()
    b = None if linear.bias is None else linear.bias.detach()
    sel = select_kernel(w, b, batch_size, kernels, timer)
    choice = LayerChoice(name, (linear.out_features, linear.in_features), sparsity, sel.kernel, sel.times, sel.nbytes)
    return choice, sel


def sparsify_for_inference(
    model: nn.Module,
    batch_size: int = 1,
    min_sparsity: float = 0.3,
    kernels: Sequence[str] | None = None,
    timer: Timer | None = None,
) -> SparsifyReport:
    """Replace, in place, each eligible ``nn.Linear`` by a :class:`SparseLinear` where it is faster.

    For every ``nn.Linear`` with at least ``min_sparsity`` zeros (and a weight not shared with
    another module), each kernel in ``kernels`` (default: :func:`~.kernels.auto_candidates`
    for the weight's device; ``dense`` is always included) is checked against ``F.linear`` and
    timed at ``batch_size`` rows of input (= tokens per forward: 1 for token-by-token decode).
    The layer is replaced only when a sparse kernel beats dense; otherwise it stays as it is,
    so the model is never made slower (up to measurement noise). Outputs equal the dense
    model's within fp32 round-off. The replaced layers are inference-only (no gradients).

    ``timer(kernel_name, fn) -> seconds`` may be injected (tests use a fake one).
    Returns a :class:`SparsifyReport`.
    """
    report = SparsifyReport(batch_size=int(batch_size))
    todo = list(eligible_linears(model, min_sparsity))
    for name, lin, s, reason in todo:
        shape = (lin.out_features, lin.in_features)
        if reason is not None:
            report.layers.append(LayerChoice(name, shape, s, "dense", skipped_reason=reason))
            continue
        choice, sel = measure_layer(name, lin, s, batch_size, kernels, timer)
        report.layers.append(choice)
        if sel.kernel != "dense":
            b = None if lin.bias is None else lin.bias.detach()
            _set_module(model, name, SparseLinear(lin.in_features, lin.out_features, sel.kernel, sel.packed, b, sel))
    return report
