"""Activation sparsity (TEAL / WINA): zero the small entries of every linear layer's input.

At decode time most entries of a hidden state are close to zero; skipping them means reading
only the weight columns of the live ones. TEAL (Liu et al., ICLR 2025) keeps ``x_i`` when
``|x_i| >= t`` with one threshold ``t`` per projection, calibrated so that a fraction ``s`` of
its inputs falls below it; WINA weighs each entry by its weight column, ``|x_i| * ||W[:, i]||``.

Thresholds are the empirical ``s``-quantile of the criterion over calibration tokens, read from
a histogram with log-spaced bins (64 per octave between 2^-24 and 2^16, exact zeros in their own
bin; interpolated in log scale inside the bin that holds the quantile): no symmetry assumption
(TEAL's inverse-CDF of a zero-mean distribution is wrong for asymmetric inputs such as the
MLP's), one pass, fixed memory. Every token is sparsified, prompt included (stricter than TEAL's
evaluation, which spares half of each prompt).

The first pass sees the dense model's activations, but each layer will run on inputs that the
thresholds of the layers before it have already changed; on SmolLM2 at 40% that alone made 41%
of the inputs fall below thresholds calibrated for 40%. ``refine`` (default 1) re-reads every
layer's histogram with all thresholds applied upstream and recomputes each threshold at its
level, so that the model as it will run skips the fraction asked for. (TEAL calibrates on dense
activations only.)

    th = calibrate_thresholds(model, 0.4, tokenizer=tok)       # every Linear of the decoder blocks
    handle = apply_thresholds(model, th)                       # forward pre-hooks; handle.remove()
    th.save("thresholds.safetensors"); ActivationThresholds.load(...)
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, DataError, MethodError, SparsityValueError

CRITERIA = ("teal", "wina")
ALLOCATIONS = ("uniform", "greedy", "greedy-global")
_LO, _HI, _PER_OCTAVE = -24, 16, 64
_BINS = (_HI - _LO) * _PER_OCTAVE


def _bin_index(v: Tensor) -> Tensor:
    """Histogram bin of each non-negative value: 0 for exact zeros, then log-spaced bins."""
    pos = v > 0
    idx = torch.zeros_like(v, dtype=torch.long)
    lg = torch.log2(v[pos].clamp_min(2.0 ** _LO))
    idx[pos] = 1 + ((lg - _LO) * _PER_OCTAVE).floor().long().clamp(0, _BINS - 1)
    return idx


def _bin_upper(i: float) -> float:
    """Upper edge of bin ``i`` (bin 0 holds exact zeros: its edge is the smallest positive value);
    a fractional ``i`` is that far into bin ``ceil(i)`` in log scale."""
    return 2.0 ** (_LO + i / _PER_OCTAVE)


def quantile_from_histogram(counts: Tensor, q: float) -> float:
    """The threshold ``t`` with a fraction ``q`` of the values below it: inside the bin that holds
    the ``q``-quantile, interpolated in log scale as if that bin's values were spread evenly there
    (the bins are 2^(1/64) wide: without it, ``t`` is the bin's upper edge and skips up to one bin's
    worth of values more than asked). A quantile that falls among the exact zeros gives the
    smallest positive value: only the zeros are below it."""
    total = float(counts.sum())
    if total == 0:
        raise DataError("no calibration values reached this layer.")
    if q <= 0:
        return 0.0
    cdf = torch.cumsum(counts.double(), 0) / total
    i = min(int(torch.searchsorted(cdf, torch.tensor([q], dtype=torch.float64) - 1e-12)[0]), _BINS)
    if i == 0:
        return _bin_upper(0)
    below = float(cdf[i - 1])
    inside = float(counts[i]) / total
    frac = min(max((q - below) / inside, 0.0), 1.0) if inside > 0 else 1.0
    return _bin_upper(i - 1 + frac)


@dataclass
class ActivationThresholds:
    """One threshold per Linear (by module name) and how it is applied."""

    sparsity: float
    criterion: str
    thresholds: dict[str, float] = field(default_factory=dict)
    calibration_tokens: int = 0
    #: WINA only: each layer's weight column norms ``||W[:, i]||`` at calibration (the criterion's
    #: scale; kept so the hooks work after the layer is swapped for a packed sparse kernel)
    col_norms: dict[str, Tensor] = field(default_factory=dict)
    #: ``"uniform"`` (every layer at ``sparsity``), ``"greedy"`` (TEAL's per-block search, :mod:`.greedy`)
    #: or ``"greedy-global"`` (that search, plus per-block levels set by each block's measured cost)
    allocation: str = "uniform"
    #: each layer's level (fraction of its inputs below its threshold on the calibration tokens)
    levels: dict[str, float] = field(default_factory=dict)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ActivationThresholds):
            return NotImplemented
        return (self.sparsity, self.criterion, self.thresholds, self.calibration_tokens, self.allocation,
                self.levels) == (other.sparsity, other.criterion, other.thresholds, other.calibration_tokens,
                                 other.allocation, other.levels) and \
            self.col_norms.keys() == other.col_norms.keys() and \
            all(torch.equal(v, other.col_norms[k]) for k, v in self.col_norms.items())

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = True) -> Path:
        """Write as safetensors + JSON metadata (no pickle; atomic). ``overwrite=False`` refuses
        an existing file (the CLI's default)."""
        from ..statefile import save_state

        return save_state({"sparsity": self.sparsity, "criterion": self.criterion,
                           "thresholds": dict(self.thresholds), "calibration_tokens": self.calibration_tokens,
                           "col_norms": dict(self.col_norms), "kind": "activation-thresholds",
                           "allocation": self.allocation, "levels": dict(self.levels)}, path, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ActivationThresholds:
        from ..statefile import load_state

        st = load_state(path)
        if not isinstance(st, dict) or st.get("kind") != "activation-thresholds":
            raise CheckpointError(f"{path} is not an activation thresholds file (written by "
                                  "ActivationThresholds.save / `sparsetorch plan --activation-sparsity S "
                                  "--save-thresholds FILE`).")
        try:
            th = cls(float(st["sparsity"]), str(st["criterion"]),
                     {str(k): float(v) for k, v in st["thresholds"].items()}, int(st.get("calibration_tokens", 0)),
                     {str(k): v for k, v in (st.get("col_norms") or {}).items()},
                     str(st.get("allocation", "uniform")),
                     {str(k): float(v) for k, v in (st.get("levels") or {}).items()})
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{path} is a damaged activation thresholds file ({type(exc).__name__}: {exc}); "
                                  "recalibrate it (calibrate_thresholds / `sparsetorch plan --activation-sparsity S "
                                  "--save-thresholds FILE`).") from None
        problem = th._problem()
        if problem:
            raise CheckpointError(f"{path}: {problem}; the file was edited or written by another version -- "
                                  "recalibrate it.")
        return th

    def _problem(self) -> str | None:
        """What makes these thresholds unusable (a value out of range, an unknown name), or None."""
        if not 0.0 <= self.sparsity < 1.0:
            return f"sparsity {self.sparsity} is outside [0, 1)"
        if self.criterion not in CRITERIA:
            return f"unknown criterion {self.criterion!r} (known: {', '.join(CRITERIA)})"
        if self.allocation not in ALLOCATIONS:
            return f"unknown allocation {self.allocation!r} (known: {', '.join(ALLOCATIONS)})"
        bad = next((n for n, t in self.thresholds.items() if not (math.isfinite(t) and t >= 0)), None)
        if bad is not None:
            return f"the threshold of {bad} is {self.thresholds[bad]} (must be finite and >= 0)"
        bad = next((n for n, v in self.levels.items() if not 0.0 <= v <= 1.0), None)
        if bad is not None:
            return f"the level of {bad} is {self.levels[bad]} (must lie in [0, 1])"
        bad = next((n for n, v in self.col_norms.items() if not isinstance(v, Tensor) or v.dim() != 1), None)
        if bad is not None:
            return f"the column norms of {bad} are not a vector"
        if self.criterion == "wina" and set(self.col_norms) != set(self.thresholds):
            return "WINA thresholds without the column norms of every layer"
        return None


def default_targets(model: nn.Module) -> list[str]:
    """Every ``nn.Linear`` inside the decoder blocks (the LM head and embeddings are left dense)."""
    from ..oneshot.blocks import find_decoder_blocks

    name, blocks = find_decoder_blocks(model)
    return [f"{name}.{n}" for n, m in blocks.named_modules() if isinstance(m, nn.Linear)]


def _criterion(x: Tensor, criterion: str, col_norm: Tensor | None) -> Tensor:
    a = x.detach().abs().float()
    return a * col_norm if criterion == "wina" else a


def _col_norms(model: nn.Module, names: Iterable[str], criterion: str) -> dict[str, Tensor | None]:
    out: dict[str, Tensor | None] = {}
    for n in names:
        lin = model.get_submodule(n)
        out[n] = lin.weight.detach().float().norm(dim=0) if criterion == "wina" else None
    return out


def check_sparsity_level(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise SparsityValueError(f"activation sparsity must be in [0, 1), got {sparsity!r}.")
    return float(sparsity)


@torch.no_grad()
def calibrate_thresholds(
    model: nn.Module,
    sparsity: float,
    *,
    calibration: Any = None,
    tokenizer: Any = None,
    criterion: str = "teal",
    targets: list[str] | None = None,
    num_samples: int = 16,
    seq_len: int = 512,
    batch_size: int = 4,
    allocation: str = "uniform",
    greedy_step: float = 0.1,
    greedy_samples: int = 2,
    refine: int = 1,
) -> ActivationThresholds:
    """Per-Linear thresholds that zero a fraction ``sparsity`` of each layer's inputs on the
    calibration data (default: the embedded calibration text through ``tokenizer``).

    ``allocation="greedy"``: TEAL's per-block greedy search (:mod:`.greedy`) spreads the level
    over each block's projections (the block's weight reads skipped stay ``sparsity``), measured
    on the first ``greedy_samples`` calibration windows, raising one input group by
    ``greedy_step`` (in units of the block's smallest group) per step. ``"greedy-global"`` also
    moves sparsity between blocks: each block's level is set from its measured cost to the model's
    next-token distribution (:func:`.greedy.allocate_blocks`), the mean over blocks (by weights
    gated) staying ``sparsity``.

    ``refine``: passes over the calibration data after the first, each with every threshold
    applied, re-reading each layer's input (as the thresholds upstream left it) and recomputing
    its threshold at the same level (0: thresholds from the dense model's activations, as TEAL)."""
    from ..oneshot.calibration import forward_batches, prepare_calibration

    s = check_sparsity_level(sparsity)
    if criterion not in CRITERIA:
        raise MethodError(f"unknown activation criterion {criterion!r}; choose from {', '.join(CRITERIA)}.")
    if allocation not in ALLOCATIONS:
        raise MethodError(f"unknown activation allocation {allocation!r}; choose from {', '.join(ALLOCATIONS)}.")
    if allocation.startswith("greedy"):
        if not (isinstance(greedy_step, (int, float)) and 0 < greedy_step <= 1):
            raise MethodError(f"greedy_step must be in (0, 1], got {greedy_step!r}.")
        if not (isinstance(greedy_samples, int) and greedy_samples >= 1):
            raise MethodError(f"greedy_samples must be a positive number of windows, got {greedy_samples!r}.")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise MethodError(f"refine must be a whole number of passes >= 0, got {refine!r}.")
    names = targets if targets is not None else default_targets(model)
    if not names:
        raise DataError("no Linear layers to sparsify the inputs of.")
    for n in names:
        try:
            mod = model.get_submodule(n) if isinstance(n, str) else None
        except AttributeError:
            mod = None
        if mod is None:
            linear = [k for k, m in model.named_modules() if isinstance(m, nn.Linear)]
            raise DataError(f"the model has no module {n!r}; targets are module names such as "
                            f"{', '.join(map(repr, linear[:3]))}" + (" ..." if len(linear) > 3 else "") + ".")
        if not isinstance(mod, nn.Linear):
            raise DataError(f"{n} is not an nn.Linear: activation thresholds apply to Linear inputs.")
    batches = prepare_calibration(model, calibration, tokenizer, num_samples=num_samples, seq_len=seq_len,
                                  batch_size=batch_size)
    norms = _col_norms(model, names, criterion)
    counts = {n: torch.zeros(_BINS + 1, dtype=torch.long) for n in names}

    def make(n: str):  # noqa: ANN202
        def hook(_mod: nn.Module, args: tuple) -> None:
            v = _criterion(args[0], criterion, norms[n]).reshape(-1)
            counts[n] += torch.bincount(_bin_index(v).cpu(), minlength=_BINS + 1)
        return hook

    forward_batches(model, batches, [model.get_submodule(n).register_forward_pre_hook(make(n)) for n in names])
    levels = dict.fromkeys(names, s)
    if allocation.startswith("greedy") and s > 0:
        from .greedy import greedy_levels, input_groups

        ids = torch.cat([b["input_ids"] for b in batches])[:greedy_samples]
        small = [{"input_ids": ids[i:i + 1]} for i in range(ids.shape[0])]
        groups = input_groups(model, names, small[0])
        levels, _ = greedy_levels(
            model, small, groups, lambda n, lv: quantile_from_histogram(counts[n], lv),
            lambda n, x: _criterion(x, criterion, norms[n]), s, step=float(greedy_step),
            across_blocks=allocation == "greedy-global")
    th = {n: quantile_from_histogram(counts[n], levels[n]) for n in names}
    kept = {n: v.cpu() for n, v in norms.items() if v is not None}
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    for _ in range(refine if s > 0 else 0):
        for c in counts.values():
            c.zero_()
        # the counting hooks go first: each sees its layer's input as the thresholds upstream left it
        collect = [model.get_submodule(n).register_forward_pre_hook(make(n)) for n in names]
        applied = apply_thresholds(model, ActivationThresholds(s, criterion, th, tokens, kept, allocation, levels),
                                   count=False)
        try:
            forward_batches(model, batches, collect)
        finally:
            applied.remove()
        th = {n: quantile_from_histogram(counts[n], levels[n]) for n in names}
    return ActivationThresholds(s, criterion, th, tokens, kept, allocation, levels)


class ThresholdHandle:
    """The installed pre-hooks; counts the zeros they make (``measured_sparsity``); ``remove()``."""

    def __init__(self) -> None:
        self.hooks: list[Any] = []
        self.zeros = 0
        self.total = 0

    @property
    def measured_sparsity(self) -> float:
        """Fraction of the sparsified layers' input entries set to zero since installed or reset."""
        return self.zeros / self.total if self.total else math.nan

    def reset(self) -> None:
        self.zeros = self.total = 0

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()


def apply_thresholds(model: nn.Module, th: ActivationThresholds, count: bool = True,
                     skip: Iterable[str] = ()) -> ThresholdHandle:
    """Install forward pre-hooks that zero each targeted layer's small inputs (an ``nn.Linear`` or
    a :class:`~sparsetorch.inference.SparseLinear` that replaced one), except the layers in
    ``skip`` (their kernel applies the threshold). ``count=False`` skips the zero count (faster).
    Raises :class:`DataError` when a threshold names a layer the model does not have."""
    handle = ThresholdHandle()
    norms: dict[str, Tensor | None] = {}
    for n in th.thresholds:
        try:
            lin = model.get_submodule(n)
        except AttributeError:
            raise DataError(f"the thresholds name {n!r}, which this model does not have: they were calibrated "
                            "on another architecture.") from None
        inp = getattr(lin, "in_features", None)
        if inp is None:
            raise DataError(f"{n} is not a linear layer (no in_features).")
        norms[n] = None
        if th.criterion == "wina":
            if n not in th.col_norms or th.col_norms[n].numel() != inp:
                raise DataError(f"the WINA thresholds carry no column norms of length {inp} for {n}: recalibrate.")
            dev = next((b.device for b in lin.buffers()), None) or next((p.device for p in lin.parameters()), None)
            norms[n] = th.col_norms[n].to(dev) if dev is not None else th.col_norms[n]

    def make(n: str, t: float):  # noqa: ANN202
        def hook(_mod: nn.Module, args: tuple) -> tuple:
            x = args[0]
            drop = _criterion(x, th.criterion, norms[n]) < t
            if count:
                handle.zeros += int(drop.sum())
                handle.total += drop.numel()
            return (x.masked_fill(drop, 0), *args[1:])
        return hook

    skipped = set(skip)
    for n, t in th.thresholds.items():
        if n not in skipped:
            handle.hooks.append(model.get_submodule(n).register_forward_pre_hook(make(n, t)))
    return handle


def sparsify_activations(model: nn.Module, sparsity: float = 0.4, calib: Any = None,
                         **calibrate_kw: Any) -> tuple[ThresholdHandle, ActivationThresholds]:
    """Calibrate (:func:`calibrate_thresholds`) and install (:func:`apply_thresholds`) in one call.

    ``calib``: the calibration data (``calibration=`` of :func:`calibrate_thresholds`: token ids
    ``[N, T]``, a list of texts with ``tokenizer=``, or None for the embedded calibration text);
    the other keywords go to :func:`calibrate_thresholds`. Returns the installed hooks (their
    ``remove()`` puts the model back) and the thresholds (``.save(path)`` keeps them)."""
    if calib is not None and "calibration" in calibrate_kw:
        raise DataError("give the calibration data once: calib= or calibration=, not both.")
    unknown = set(calibrate_kw) - _CALIBRATE_KEYWORDS
    if unknown:
        raise DataError(f"sparsify_activations got unknown keyword(s) {', '.join(sorted(unknown))}; "
                        f"it takes calib= and the keywords of calibrate_thresholds: {', '.join(sorted(_CALIBRATE_KEYWORDS))}.")
    if calib is not None:
        calibrate_kw["calibration"] = calib
    th = calibrate_thresholds(model, sparsity, **calibrate_kw)
    return apply_thresholds(model, th), th


#: the keyword arguments of :func:`calibrate_thresholds` (checked by :func:`sparsify_activations`)
_CALIBRATE_KEYWORDS = frozenset(inspect.signature(calibrate_thresholds).parameters) - {"model", "sparsity"}
