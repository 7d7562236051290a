"""``sparsetorch.prune``: one-shot pruning of a trained model, the entry point of ``oneshot/``.

Data-free methods (``magnitude``, ``random``) score every targeted weight directly. Methods
that need calibration data (Wanda, SparseGPT, DSnoT ...) are registered in
``sparsetorch.oneshot.SOLVERS`` and run by the block-sequential pipeline there; so does
``magnitude`` with a data-driven allocation (``owl``, ``sensitivity``). Extra keyword
arguments go to that pipeline (``true_sequential``, ``reconstruct``, ``batch_size``,
``progress`` ...) or to the solver (``percdamp``, ``blocksize``, ``initial``, ``threshold`` ...);
see :func:`sparsetorch.oneshot.run_oneshot`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import allocation as alloc
from .errors import DataError, MethodError, ModelError, close_matches
from .masks import MaskSet
from .patterns import Pattern, parse_pattern
from .scores import get_score
from .targets import select

DATA_FREE = ("magnitude", "random")
#: allocations of the calibrated block pipeline (:func:`sparsetorch.oneshot.run_oneshot`)
CALIBRATED_ALLOCATIONS = ("uniform", "owl", "sensitivity")
#: one-shot solvers support these patterns (and every N:M)
SOLVER_PATTERNS = ("unstructured", "rowwise")


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, ...]
    numel: int
    sparsity: float


@dataclass
class PruneReport:
    """What one-shot pruning did: settings, achieved sparsity, per-layer table, time."""

    method: str
    pattern: str
    allocation: str
    sparsity_target: float
    sparsity_actual: float
    seconds_prune: float
    layers: list[LayerReport]
    masks: MaskSet = field(repr=False)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_masks(
        cls,
        model: nn.Module,
        masks: MaskSet,
        *,
        method: str,
        pattern: Pattern,
        allocation: str,
        sparsity_target: float,
        seconds_prune: float,
        extra: dict[str, Any] | None = None,
    ) -> PruneReport:
        """Report for ``masks`` applied to ``model``; achieved sparsity and layers come from the masks."""
        return cls(
            method=method,
            pattern=str(pattern),
            allocation=allocation,
            sparsity_target=sparsity_target,
            sparsity_actual=masks.sparsity().overall,
            seconds_prune=seconds_prune,
            layers=layer_reports(model, masks),
            masks=masks,
            extra=extra or {},
        )

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("masks", "layers")}
        d["layers"] = [asdict(layer) for layer in self.layers]
        return d


def layer_reports(model: nn.Module, masks: MaskSet) -> list[LayerReport]:
    params = dict(model.named_parameters())
    st = masks.sparsity()
    return [
        LayerReport(n, tuple(params[n].shape), params[n].numel(), st.per_layer[n]) for n in masks
    ]


def _available_methods() -> list[str]:
    from .oneshot import SOLVERS

    return list(dict.fromkeys([*DATA_FREE, *SOLVERS]))


def available_allocations() -> list[str]:
    """Every allocation name :func:`prune` knows (data-free and calibrated)."""
    return list(dict.fromkeys([*alloc.ALLOCATIONS, *CALIBRATED_ALLOCATIONS]))


def normalise_name(value: Any, what: str, choices: Sequence[str]) -> str:
    """``value`` stripped and lower-cased, checked against ``choices`` (MethodError otherwise).

    Names (methods, allocations) are compared only after this, once, at the API boundary, so
    ``"Global"`` means ``"global"`` everywhere downstream.
    """
    if not isinstance(value, str) or not value.strip():
        raise MethodError(f"{what} must be a name, one of: {', '.join(choices)}; got {value!r}.")
    name = value.strip().lower()
    if name not in choices:
        raise MethodError(
            f"unknown {what} {value!r}; available: {', '.join(choices)}." + close_matches(name, choices)
        )
    return name


@dataclass(frozen=True)
class PruneRequest:
    """The model-independent arguments of :func:`prune`, validated and normalised."""

    method: str
    sparsity: float
    pattern: Pattern
    allocation: str
    #: True: scored directly (magnitude/random); False: the calibrated block pipeline
    data_free: bool
    options: dict[str, Any]


def check_request(
    method: str = "magnitude",
    sparsity: float | None = 0.5,
    pattern: str | Pattern = "unstructured",
    *,
    allocation: str = "uniform",
    options: dict[str, Any] | None = None,
    num_samples: int = 128,
    seq_len: int = 512,
) -> PruneRequest:
    """Validate everything :func:`prune` can check without a model, and normalise the names.

    Method, allocation, pattern and sparsity, their combinations, and every solver/pipeline
    option value (:mod:`sparsetorch.oneshot.base`). The CLI calls this before it loads a model,
    so a typo costs nothing; :func:`prune` calls it first too.
    """
    pat = parse_pattern(pattern)
    s = pat.resolve_sparsity(sparsity)  # validates the range and N:M consistency
    method_l = normalise_name(method, "pruning method", _available_methods())
    allocation_l = normalise_name(allocation, "allocation", available_allocations())
    for name, v, low in (("num_samples", num_samples, 1), ("seq_len", seq_len, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise DataError(f"{name} must be an integer >= {low}, got {v!r}.")
    opts = dict(options or {})
    if pat.fixed_sparsity is not None and allocation_l != "uniform":
        raise MethodError(f"allocation {allocation!r} cannot be combined with the N:M pattern {pat}; use uniform.")
    data_free = (
        method_l in DATA_FREE
        and allocation_l not in ("owl", "sensitivity")
        and not opts.get("refit")  # a refit needs the calibration statistics
    )
    if data_free:
        if opts:
            raise MethodError(f"method {method!r} takes no options, got {sorted(opts)}.")
        return PruneRequest(method_l, s, pat, allocation_l, True, {})

    from .oneshot import SOLVERS
    from .oneshot.base import PIPELINE_OPTION_SPECS, check_options

    if method_l not in SOLVERS:
        raise MethodError(
            f"method {method!r} has no calibrated solver, so it cannot run with allocation {allocation!r} "
            f"or a refit; calibrated methods: {', '.join(SOLVERS)}."
        )
    if allocation_l not in CALIBRATED_ALLOCATIONS:
        raise MethodError(
            f"allocation {allocation!r} is not available for one-shot pruning with calibration data; "
            f"use one of {', '.join(CALIBRATED_ALLOCATIONS)} (or a data-free method for {allocation_l})."
        )
    if pat.name not in SOLVER_PATTERNS and pat.fixed_sparsity is None:
        raise MethodError(f"one-shot solvers support unstructured, rowwise and N:M patterns, not {pat}.")
    pipe = check_options("pipeline", PIPELINE_OPTION_SPECS, {k: v for k, v in opts.items() if k in PIPELINE_OPTION_SPECS})
    solver = SOLVERS[method_l].check_options({k: v for k, v in opts.items() if k not in PIPELINE_OPTION_SPECS})
    return PruneRequest(method_l, s, pat, allocation_l, False, {**pipe, **solver})


def check_model(model: Any) -> nn.Module:
    """ModelError unless ``model`` is an ``nn.Module`` whose weights are materialised (not meta)."""
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"prune needs a torch.nn.Module (e.g. a transformers model), got {type(model).__name__}."
        )
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ModelError(
            f"{len(meta)} parameter(s) of the model are on the meta device (no weights loaded), e.g. "
            f"{meta[0]!r}. Load the weights first (no init_empty_weights/device_map='meta'), or stream a "
            "saved folder with sparsetorch.oneshot.offload.prune_pretrained."
        )
    return model


def select_checked(
    model: nn.Module, pattern: Pattern, targets: Any = None, ignore: Any = None
) -> dict[str, nn.Parameter]:
    """The targeted parameters (:func:`~sparsetorch.targets.select`), each checked against ``pattern``."""
    params = select(model, targets, ignore)
    for name, p in params.items():
        pattern.check_shape(p.shape, name)
    return params


def prune(
    model: nn.Module,
    method: str = "magnitude",
    sparsity: float | None = 0.5,
    pattern: str | Pattern = "unstructured",
    *,
    allocation: str = "uniform",
    targets: str | Sequence[str] | None = None,
    ignore: str | Sequence[str] | None = None,
    calibration: Any = None,
    tokenizer: Any = None,
    num_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    **method_kwargs: Any,
) -> PruneReport:
    """Prune ``model`` in place and return a :class:`PruneReport` (its ``masks`` included).

    ``sparsity`` is the fraction of zeros per targeted layer (or on average, for non-uniform
    allocations); with an N:M ``pattern`` it may be None (implied by N:M). ``targets`` /
    ``ignore`` choose layers (see :mod:`sparsetorch.targets`).
    """
    req = check_request(method, sparsity, pattern, allocation=allocation, options=method_kwargs,
                        num_samples=num_samples, seq_len=seq_len)
    check_model(model)
    pat, s, method_l, allocation = req.pattern, req.sparsity, req.method, req.allocation
    params = select_checked(model, pat, targets, ignore)

    if not req.data_free:
        from .oneshot import run_oneshot

        return run_oneshot(
            model,
            method=method_l,
            sparsity=s,
            pattern=pat,
            allocation=allocation,
            params=params,
            calibration=calibration,
            tokenizer=tokenizer,
            num_samples=num_samples,
            seq_len=seq_len,
            seed=seed,
            **req.options,
        )

    t0 = time.perf_counter()
    score_fn = get_score(method_l)
    with torch.no_grad():
        scores: dict[str, Tensor] | None = None
        if allocation == "global":  # one threshold over every layer: all scores at once
            scores = {n: score_fn(p, seed=seed + i) for i, (n, p) in enumerate(params.items())}
            sparsities = alloc.global_magnitude(params, s, scores=scores)
        else:
            sparsities = alloc.allocate(allocation, params, s)
        keep = {}
        for i, (n, p) in enumerate(params.items()):
            # one layer's fp32 score at a time (all of them at once would add 4 bytes per weight)
            sc = scores.pop(n) if scores is not None else score_fn(p, seed=seed + i)
            keep[n] = MaskSet.from_scores({n: sc}, sparsities, pat).masks[n]
            del sc
        masks = MaskSet(keep, pat)
        masks.apply(model)
    return PruneReport.from_masks(
        model,
        masks,
        method=method_l,
        pattern=pat,
        allocation=allocation,
        sparsity_target=s,
        seconds_prune=time.perf_counter() - t0,
    )
