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
from .errors import MethodError, close_matches
from .masks import MaskSet
from .patterns import Pattern, parse_pattern
from .scores import get_score
from .targets import select

DATA_FREE = ("magnitude", "random")


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
    names = list(DATA_FREE)
    try:
        from .oneshot import SOLVERS

        names += [n for n in SOLVERS if n not in names]
    except ImportError:
        pass
    return names


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
    pat = parse_pattern(pattern)
    s = pat.resolve_sparsity(sparsity)  # validates the range and N:M consistency
    method_l = method.lower()
    params = select_checked(model, pat, targets, ignore)

    data_free = (
        method_l in DATA_FREE
        and allocation.lower() not in ("owl", "sensitivity")
        and not method_kwargs.get("refit")  # a refit needs the calibration statistics
    )
    if not data_free:
        try:
            from .oneshot import SOLVERS, run_oneshot
        except ImportError:
            SOLVERS, run_oneshot = {}, None  # noqa: N806
        if method_l not in SOLVERS or run_oneshot is None:
            raise MethodError(
                f"unknown pruning method {method!r}; available: {', '.join(_available_methods())}."
                + close_matches(method_l, _available_methods())
            )
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
            **method_kwargs,
        )

    if method_kwargs:
        raise MethodError(f"method {method!r} takes no options, got {sorted(method_kwargs)}.")
    if pat.fixed_sparsity is not None and allocation != "uniform":
        raise MethodError(f"allocation {allocation!r} cannot be combined with an N:M pattern; use uniform.")
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
