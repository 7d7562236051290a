"""Pick the fastest kernel for one weight by a short measurement, never slower than dense.

A *timer* is any callable ``timer(kernel_name, fn) -> seconds`` that returns how long one
call of ``fn`` takes. The default, :func:`median_timer`, runs ``fn`` a few times and returns
the median; tests inject a fake timer (e.g. a dict lookup on the name) so the selection logic
is checked without any timing.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .bench import device_sync
from .kernels import Packed, get_kernel

__all__ = ["Timer", "mean_timer", "median_timer", "Selection", "select_kernel", "DEFAULT_MARGIN"]

Timer = Callable[[str, Callable[[], object]], float]

#: a sparse kernel must be at least this much faster than dense to be chosen
DEFAULT_MARGIN = 0.05

#: a multi-threaded kernel must beat its single-thread twin by this much to be chosen: in a
#: model, between layers, the second core may be taken by other work, and a parallel region
#: then waits for it (measured: 2-thread decode slower than dense on a busy 2-core machine)
PARALLEL_MARGIN = 0.25
_SERIAL_TWIN = {"bitmask": "bitmask_serial", "csr": "csr_serial"}


def mean_timer(
    name: str, fn: Callable[[], object], *, repeats: int = 15, warmup: int = 2, budget_s: float = 0.2
) -> float:
    """Mean wall time of ``fn()`` in seconds over up to ``repeats`` back-to-back calls.

    The mean, not the median: on a machine shared with other work a multi-threaded kernel now
    and then waits milliseconds for a busy core, and those stalls are part of its real cost.
    Stops early once ``budget_s`` is spent (after at least 3 calls).
    """
    for _ in range(warmup):
        fn()
    device_sync()
    n = 0
    start = time.perf_counter()
    while n < repeats:
        fn()
        n += 1
        if n >= 3:
            device_sync()
            if time.perf_counter() - start > budget_s:
                break
    device_sync()
    return (time.perf_counter() - start) / n


#: backwards-compatible name
median_timer = mean_timer


@dataclass
class Selection:
    """Outcome of :func:`select_kernel` for one weight."""

    kernel: str
    #: seconds per call for every kernel measured (median over rounds)
    times: dict[str, float] = field(default_factory=dict)
    #: packed tensors of the chosen kernel
    packed: Packed = field(default_factory=dict)
    #: bytes of the packed weight per kernel measured
    nbytes: dict[str, int] = field(default_factory=dict)
    #: kernels skipped, with the reason
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        """Dense time / chosen time (1.0 when dense was chosen or not measured)."""
        d, c = self.times.get("dense"), self.times.get(self.kernel)
        return d / c if d and c else 1.0


def _tolerance_ok(y: Tensor, ref: Tensor) -> bool:
    """Whether a kernel's output ``y`` matches dense ``ref`` (same shape, finite, close).

    Close: max |y - ref| <= tol * max(max |ref|, 1), with tol 1e-4 for fp32/fp64 outputs and
    2e-2 for 16-bit floats, whose results round to about 3 (fp16) or 2 (bf16) significant
    digits, so two correct kernels summing in different orders differ by an ulp or more. A
    wrong kernel (bad indices, a missing group) is off by the size of the output itself.
    """
    if y.shape != ref.shape:
        return False
    if not ref.numel():
        return True
    tol = 1e-4 if ref.dtype in (torch.float32, torch.float64) else 2e-2
    y, ref = y.float(), ref.float()
    scale = ref.abs().max().item()
    return bool((y - ref).abs().max().item() <= tol * max(scale, 1.0))


def select_kernel(
    weight: Tensor,
    bias: Tensor | None,
    batch_size: int = 1,
    candidates: Sequence[str] | None = None,
    timer: Timer | None = None,
    *,
    rounds: int = 3,
    margin: float = DEFAULT_MARGIN,
    seed: int = 0,
    input_sparsity: float = 0.0,
) -> Selection:
    """Measure each candidate kernel at ``batch_size`` and return the fastest.

    ``dense`` is always measured; a sparse kernel is chosen only if it is faster than dense by
    more than ``margin`` (relative), so the choice is never slower than dense up to measurement
    noise; a multi-threaded kernel must also beat its single-thread twin by ``PARALLEL_MARGIN``.
    Each candidate is first checked against ``F.linear`` on a random input; a kernel
    that is unavailable, cannot hold the weight, raises, or disagrees is skipped (with a
    warning for the last two). Measurements are interleaved over ``rounds`` rounds and the
    median round counts, so a burst of load on a shared machine hurts every kernel alike and
    a kernel that only sometimes runs fast is not favoured. ``input_sparsity``: the fraction of
    each input row that is exactly zero (activation sparsity), so kernels that skip zero inputs
    are measured on the inputs they will get.
    """
    from .kernels import auto_candidates

    timer = timer or mean_timer
    names = list(candidates) if candidates is not None else auto_candidates(weight.device)
    if "dense" in names:
        names.remove("dense")
    names.insert(0, "dense")

    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(max(int(batch_size), 1), weight.shape[1], generator=gen)
    if input_sparsity > 0:  # thresholded activations: this fraction of every row is exactly zero
        dead = int(round(input_sparsity * weight.shape[1]))
        order = torch.rand(x.shape, generator=gen).argsort(dim=1)[:, :dead]
        x.scatter_(1, order, 0.0)
    x = x.to(weight.device, weight.dtype)
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, weight, bias)

    sel = Selection(kernel="dense")
    packs: dict[str, Packed] = {}
    fns: dict[str, Callable[[], object]] = {}
    for name in names:
        kernel = get_kernel(name)
        if not kernel.available():
            sel.skipped[name] = "not available"
            continue
        reason = kernel.supports(weight)
        if reason is not None:
            sel.skipped[name] = reason
            continue
        try:
            with torch.no_grad():
                packed = kernel.pack(weight)
                y = kernel.matmul(x, packed, bias, weight.shape[0])
        except Exception as exc:  # a kernel that fails is skipped, never fatal
            sel.skipped[name] = f"failed: {type(exc).__name__}: {exc}"
            warnings.warn(f"inference kernel {name!r} failed and is skipped: {exc}", RuntimeWarning, stacklevel=2)
            continue
        if not _tolerance_ok(y, ref):
            sel.skipped[name] = "output differs from dense"
            warnings.warn(f"inference kernel {name!r} disagrees with F.linear and is skipped", RuntimeWarning, stacklevel=2)
            continue
        packs[name] = packed
        sel.nbytes[name] = kernel.nbytes(packed)
        fns[name] = (lambda k=kernel, p=packed: k.matmul(x, p, bias, weight.shape[0]))

    per: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for _ in range(max(1, rounds)):
            for name, fn in fns.items():
                per[name].append(float(timer(name, fn)))
    best = {name: statistics.median(ts) for name, ts in per.items()}
    sel.times = best

    dense_t = best.get("dense", float("inf"))
    choice = "dense"
    for name, t in best.items():
        twin = _SERIAL_TWIN.get(name)
        if twin in best and t > best[twin] * (1.0 - PARALLEL_MARGIN):
            continue  # not clearly better than the same kernel on one thread
        if name != "dense" and t < dense_t * (1.0 - margin) and t < best[choice]:
            choice = name
    if choice == "dense" and "dense" not in packs:  # dense always packs; defensive
        packs["dense"] = get_kernel("dense").pack(weight)
    sel.kernel = choice
    sel.packed = packs[choice]
    return sel
