"""``sparsify_for_inference``: swap eligible ``nn.Linear`` layers for the fastest kernel."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .bench import interleaved_medians
from .linear import SparseLinear
from .select import DEFAULT_MARGIN, Selection, Timer, select_kernel

__all__ = [
    "LayerChoice",
    "ModelCheck",
    "SparsifyReport",
    "decode_step_input",
    "eligible_linears",
    "sparsify_for_inference",
    "weight_sparsity",
]

#: predicted per-layer speedups that define the nested layer subsets the whole-forward check tries
#: (all chosen layers, then only those predicted at least 1.5x, 2x, 3x faster than dense)
SUBSET_THRESHOLDS = (1.0, 1.5, 2.0, 3.0)


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
    #: the per-layer measurement chose this sparse kernel, but the whole-forward check put the
    #: dense layer back because the model ran faster without it
    reverted_from: str | None = None

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
class ModelCheck:
    """The whole-forward check: median seconds of one model forward per layer subset tried."""

    #: subset name ("dense", "all", ">=1.5x", ...) -> median seconds of one forward
    seconds: dict[str, float]
    #: the subset kept ("dense" when no sparse subset beat dense by the margin)
    chosen: str
    rounds: int
    margin: float

    @property
    def speedup(self) -> float:
        """Dense forward time / chosen forward time (1.0 when dense was kept)."""
        return self.seconds["dense"] / self.seconds[self.chosen] if self.seconds.get(self.chosen) else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "chosen": self.chosen, "speedup": self.speedup,
                "rounds": self.rounds, "margin": self.margin}


@dataclass
class SparsifyReport:
    """Per-layer kernel choices of :func:`sparsify_for_inference`."""

    batch_size: int
    layers: list[LayerChoice] = field(default_factory=list)
    #: the whole-forward check, or None when it did not run (no example input, or disabled)
    model_check: ModelCheck | None = None
    #: with ``activation=``: the installed threshold hooks (``measured_sparsity``, ``remove()``)
    activation: Any = field(default=None, repr=False)

    @property
    def reverted(self) -> list[LayerChoice]:
        """Layers the per-layer measurement chose a sparse kernel for, put back by the model check."""
        return [c for c in self.layers if c.reverted_from is not None]

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
            "model_check": None if self.model_check is None else self.model_check.to_dict(),
            "reverted": [c.name for c in self.reverted],
            "layers": [
                {
                    "name": c.name,
                    "shape": list(c.shape),
                    "sparsity": c.sparsity,
                    "kernel": c.kernel,
                    "times_s": c.times,
                    "nbytes": c.nbytes,
                    "skipped_reason": c.skipped_reason,
                    "reverted_from": c.reverted_from,
                }
                for c in self.layers
            ],
        }

    def __str__(self) -> str:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.kernel_counts().items()))
        text = (
            f"sparsify_for_inference (batch {self.batch_size}): {len(self.replaced)}/{len(self.layers)} "
            f"Linear layers on a sparse kernel ({counts}); measured Linear speedup "
            f"{self.linear_speedup:.2f}x"
        )
        mc = self.model_check
        if mc is not None:
            tried = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in mc.seconds.items())
            text += (f"; whole forward {mc.speedup:.2f}x of dense (kept {mc.chosen!r}; medians of "
                     f"{mc.rounds} interleaved rounds: {tried})")
            if self.reverted:
                text += f"; {len(self.reverted)} layers put back to dense"
        return text


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def layer_candidates(
    name: str, lin: nn.Linear, reason: str | None, kernels: Sequence[str] | None, activation: Any = None,
) -> tuple[Sequence[str] | None, float, str | None]:
    """``(kernels to try, input sparsity to measure at, reason to skip)`` for one layer.

    A layer with activation thresholds (``activation.thresholds`` names it) also tries the
    kernels that skip zero inputs, measured at the thresholds' sparsity; its weight need not be
    sparse (a too-dense weight then tries only ``dense`` and those kernels). Other skip reasons
    (a shared weight, inside ``nn.MultiheadAttention``) stand."""
    from .kernels import ACTIVATION_KERNELS, auto_candidates, machine_busy

    if activation is None or name not in activation.thresholds:
        return kernels, 0.0, reason
    if reason is not None and not reason.startswith("sparsity"):
        return kernels, 0.0, reason
    # the same rule as auto_candidates: on a busy machine only the single-thread variant
    act = ["colgather_serial"] if torch.get_num_threads() > 1 and machine_busy() else list(ACTIVATION_KERNELS)
    if reason is not None:
        return ["dense", *act], float(activation.sparsity), None
    base = list(kernels) if kernels is not None else auto_candidates(lin.weight.device)
    return base + [k for k in act if k not in base], float(activation.sparsity), None


def measure_layer(
    name: str, linear: nn.Linear, sparsity: float, batch_size: int, kernels: Sequence[str] | None, timer: Timer | None,
    input_sparsity: float = 0.0,
) -> tuple[LayerChoice, Selection]:
    """Run :func:`select_kernel` on one layer and describe the result."""
    w = linear.weight.detach()
    b = None if linear.bias is None else linear.bias.detach()
    sel = select_kernel(w, b, batch_size, kernels, timer, input_sparsity=input_sparsity)
    choice = LayerChoice(name, (linear.out_features, linear.in_features), sparsity, sel.kernel, sel.times, sel.nbytes)
    return choice, sel


def decode_step_input(model: nn.Module, batch_size: int) -> Callable[[], Any] | None:
    """A forward call for a Hugging Face causal LM: one decode step of ``batch_size`` tokens.

    Returns None for a model without ``config.vocab_size`` (pass ``example_input`` then).
    """
    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", None)
    if vocab is None:
        return None
    dev = next(model.parameters()).device
    ids = torch.randint(0, int(vocab), (int(batch_size), 1), generator=torch.Generator().manual_seed(0)).to(dev)
    return lambda: model(input_ids=ids, use_cache=False)


def _check_whole_forward(
    model: nn.Module,
    report: SparsifyReport,
    swaps: dict[str, tuple[nn.Module, nn.Module]],
    call: Callable[[], Any],
    model_timer: Timer | None,
    rounds: int,
    margin: float,
) -> None:
    """Time whole forwards with nested subsets of the sparse layers; keep the fastest subset.

    A layer that wins alone can lose in the model (call overhead, a second thread that waits
    for a busy core, caches shared with the neighbours), so the per-layer choice is checked
    end to end. Subsets: all chosen layers, then those predicted >= 1.5x / 2x / 3x, then none;
    each timed as the median of 3 calls per round over ``rounds`` interleaved rounds.
    A sparse subset is kept only when it beats dense by ``margin``; what it leaves out goes
    back to ``nn.Linear``, so the result is never slower than dense up to the measured noise.
    """
    by_name = {c.name: c for c in report.layers}
    subsets: dict[str, set[str]] = {"dense": set()}
    for th in SUBSET_THRESHOLDS:
        names = {n for n in swaps if by_name[n].speedup >= th}
        if names and names not in subsets.values():
            subsets["all" if th == 1.0 else f">={th:g}x"] = names

    def apply(keep: set[str]) -> Callable[[], None]:
        def go() -> None:
            for n, (dense, sparse) in swaps.items():
                _set_module(model, n, sparse if n in keep else dense)
        return go

    configs = {k: apply(v) for k, v in subsets.items()}
    with torch.no_grad():
        if model_timer is not None:
            seconds = {}
            for k, go in configs.items():
                go()
                seconds[k] = float(model_timer(f"model:{k}", call))
        else:
            seconds = interleaved_medians({k: call for k in configs}, repeats=3, rounds=rounds, setup=configs)
    best = min((k for k in seconds if k != "dense"), key=lambda k: seconds[k], default="dense")
    chosen = best if seconds[best] <= seconds["dense"] * (1.0 - margin) else "dense"
    configs[chosen]()
    for n in swaps:
        if n not in subsets[chosen]:
            c = by_name[n]
            c.reverted_from, c.kernel = c.kernel, "dense"
    report.model_check = ModelCheck(seconds, chosen, rounds, margin)


def sparsify_for_inference(
    model: nn.Module,
    batch_size: int = 1,
    min_sparsity: float = 0.3,
    kernels: Sequence[str] | None = None,
    timer: Timer | None = None,
    *,
    check_model: bool = True,
    example_input: Callable[[], Any] | None = None,
    model_timer: Timer | None = None,
    rounds: int = 7,
    margin: float = DEFAULT_MARGIN,
    activation: Any = None,
) -> SparsifyReport:
    """Replace, in place, each eligible ``nn.Linear`` by a :class:`SparseLinear` where it is faster.

    For every ``nn.Linear`` with at least ``min_sparsity`` zeros (and a weight not shared with
    another module), each kernel in ``kernels`` (default: :func:`~.kernels.auto_candidates`
    for the weight's device; ``dense`` is always included) is checked against ``F.linear`` and
    timed at ``batch_size`` rows of input (= tokens per forward: 1 for token-by-token decode).
    The layer is replaced only when a sparse kernel beats dense; otherwise it stays as it is,
    so the model is never made slower (up to measurement noise). Outputs equal the dense
    model's within fp32 round-off. The replaced layers are inference-only (no gradients).

    Then the whole model is checked (``check_model=True``): one forward — ``example_input()``,
    or for a Hugging Face causal LM a decode step of ``batch_size`` tokens — is timed with
    dense layers and with nested subsets of the chosen sparse layers, in ``rounds`` interleaved
    rounds (medians); the fastest subset is kept if it beats dense by ``margin``, and the layers
    outside it are put back (``report.reverted``, ``report.model_check``). Without an example
    input (a plain ``nn.Module`` and no ``example_input``) only the per-layer choice applies.

    ``activation`` (an :class:`~sparsetorch.activation.ActivationThresholds`): the thresholded
    layers also try the kernels that skip zero inputs (``colgather``), measured on inputs with
    the thresholds' sparsity, even when their weights are dense. A layer that gets such a kernel
    applies its threshold inside the kernel; every other thresholded layer gets the masking hook
    (``report.activation``, installed before the model check, without counting: counting costs
    time at decode).

    ``timer(kernel_name, fn) -> seconds`` may be injected (tests use a fake one), and so may
    ``model_timer(subset_name, fn)`` for the whole-forward check; when a layer ``timer`` is
    injected without ``model_timer``, the model check is skipped (fake layer times and real
    model times do not mix). Returns a :class:`SparsifyReport`.
    """
    from .kernels import ACTIVATION_KERNELS

    report = SparsifyReport(batch_size=int(batch_size))
    swaps: dict[str, tuple[nn.Module, nn.Module]] = {}
    fused: set[str] = set()
    todo = list(eligible_linears(model, min_sparsity))
    for name, lin, s, reason in todo:
        shape = (lin.out_features, lin.in_features)
        names, input_sparsity, reason = layer_candidates(name, lin, reason, kernels, activation)
        if reason is not None:
            report.layers.append(LayerChoice(name, shape, s, "dense", skipped_reason=reason))
            continue
        choice, sel = measure_layer(name, lin, s, batch_size, names, timer, input_sparsity=input_sparsity)
        report.layers.append(choice)
        if sel.kernel != "dense":
            b = None if lin.bias is None else lin.bias.detach()
            packed = sel.packed
            if input_sparsity and sel.kernel in ACTIVATION_KERNELS:  # the kernel applies the threshold itself
                packed = dict(packed, threshold=torch.tensor(float(activation.thresholds[name])))
                if activation.criterion == "wina":
                    packed["scale"] = activation.col_norms[name].float().contiguous()
                fused.add(name)
            sparse = SparseLinear(lin.in_features, lin.out_features, sel.kernel, packed, b, sel)
            swaps[name] = (lin, sparse)
            _set_module(model, name, sparse)
    if activation is not None:  # hooks on the modules as they are now (swapped ones included)
        from ..activation import apply_thresholds

        report.activation = apply_thresholds(model, activation, skip=fused, count=False)
    if check_model and swaps and (timer is None or model_timer is not None):
        call = example_input or decode_step_input(model, batch_size)
        if call is not None:
            _check_whole_forward(model, report, swaps, call, model_timer, int(rounds), float(margin))
    if report.activation is not None:  # a fused layer put back to dense needs its masking hook again
        back = {n for n in fused if not isinstance(model.get_submodule(n), SparseLinear)}
        if back:  # hook exactly those: every other layer is hooked already or still fused
            from ..activation import apply_thresholds

            report.activation.hooks += apply_thresholds(model, activation, count=False,
                                                        skip=set(activation.thresholds) - back).hooks
    return report
