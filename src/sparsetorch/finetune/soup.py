"""Sparse Model Soups (Zimmer et al., ICLR 2024): average models fine-tuned under one mask.

Children fine-tuned from one pruned parent under its mask (different seeds, data orders or
hyper-parameters) share the parent's zeros, so the parameter mean of any of them is exactly as
sparse as the parent. :func:`soup` makes the uniform soup (every child) or the greedy soup
(Wortsman et al. 2022: children sorted by their own validation score, each added only if the
soup's score does not get worse). Children whose masks differ are refused, naming the first
tensor that differs: their mean would be denser than either.

:func:`train_children` fine-tunes k children of one parent with the shared engine
:func:`~sparsetorch.finetune.loop.train_masked`, one :class:`ChildSetting` each (seed = data
order and RNG, optionally lr / weight decay), serially or in spawned processes.
:func:`iterative_sms` repeats prune -> k children -> soup for m phases (ALGORITHMS.md H.1), each
phase pruning the previous soup further by magnitude (:func:`prune_further`, through the
library's allocation and pattern code), so every phase's mask lies inside the previous one.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import allocation as alloc
from ..errors import SparsityValueError, check_sparsity
from ..masks import MaskSet
from ..patterns import Pattern
from ..scores import get_score
from .loop import FinetuneConfig, FinetuneError, FinetuneResult, train_masked

__all__ = ["Child", "ChildSetting", "PhaseRecord", "SMSResult", "SoupError", "SoupResult", "average_state",
           "check_same_masks", "check_settings", "iterative_sms", "phase_sparsities", "prune_further",
           "recalibrate_bn", "soup", "train_children"]


class SoupError(FinetuneError):
    """Models that cannot be averaged: different architectures, shapes or masks."""


@dataclass
class SoupResult:
    """The soup model, which children went in (indices into ``models``), and the scores."""

    model: nn.Module
    used: list[int]
    #: each child's own score (greedy only; in the order of ``models``)
    scores: list[float] = field(default_factory=list)
    #: the soup's score after each accepted child (greedy only)
    soup_scores: list[float] = field(default_factory=list)


def _support(model: nn.Module, masks: MaskSet | None) -> dict[str, Tensor]:
    if masks is not None:
        return {n: m.cpu() for n, m in masks.masks.items()}
    return {n: (p.detach() != 0).cpu() for n, p in model.named_parameters() if p.dim() >= 2}


def check_same_masks(models: Sequence[nn.Module], masks: Sequence[MaskSet] | None = None) -> None:
    """Raise :class:`SoupError` unless every model has the same tensors, shapes and masks.

    With ``masks`` (one MaskSet per model) those are compared; without, the zero patterns of
    every weight matrix (a kept weight that is exactly zero then counts as pruned).
    """
    if len(models) < 1:
        raise SoupError("soup needs at least one model")
    if masks is not None and len(masks) != len(models):
        raise SoupError(f"got {len(masks)} MaskSets for {len(models)} models; pass one per model or none")
    ref = dict(models[0].state_dict())
    ref_sup = _support(models[0], masks[0] if masks else None)
    for i, m in enumerate(models[1:], start=1):
        sd = m.state_dict()
        if sd.keys() != ref.keys():
            extra = sorted(set(sd) ^ set(ref))
            raise SoupError(f"model {i} has other tensors than model 0 (first difference: {extra[0]!r}); "
                            "a soup averages models of one architecture")
        for n, t in sd.items():
            if t.shape != ref[n].shape:
                raise SoupError(f"{n}: model {i} has shape {tuple(t.shape)}, model 0 {tuple(ref[n].shape)}")
        sup = _support(m, masks[i] if masks else None)
        if sup.keys() != ref_sup.keys():
            extra = sorted(set(sup) ^ set(ref_sup))
            raise SoupError(f"{extra[0]}: masked in one of model 0 and model {i} but not in the other")
        for n, s in sup.items():
            if not torch.equal(s, ref_sup[n]):
                pos = tuple(torch.nonzero(s != ref_sup[n])[0].tolist())
                raise SoupError(f"{n}: the mask of model {i} differs from model 0's (first at {pos}); a soup of "
                                "different masks is denser than its ingredients: fine-tune every child under "
                                "the parent's mask")


@torch.no_grad()
def average_state(models: Sequence[nn.Module]) -> dict[str, Tensor]:
    """The element-wise mean of the models' floating-point tensors (accumulated in float64, cast
    back to each tensor's dtype); integer and bool tensors are taken from the first model."""
    sds = [m.state_dict() for m in models]
    out: dict[str, Tensor] = {}
    for n, t in sds[0].items():
        if t.is_floating_point():
            acc = torch.zeros_like(t, dtype=torch.float64)
            for sd in sds:
                acc += sd[n].to(torch.float64)
            out[n] = (acc / len(sds)).to(t.dtype)
        else:
            out[n] = t.clone()
    return out


def _make(models: Sequence[nn.Module], idx: Sequence[int],
          recalibrate: Callable[[nn.Module], None] | None = None) -> nn.Module:
    soup_model = copy.deepcopy(models[idx[0]])
    soup_model.load_state_dict(average_state([models[i] for i in idx]))
    if recalibrate is not None:
        recalibrate(soup_model)
    return soup_model


def _score(model: nn.Module, val_fn: Callable[[nn.Module], float]) -> float:
    """``val_fn(model)`` in eval mode without gradients; the model's mode is restored."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return float(val_fn(model))
    finally:
        model.train(was)


def soup(
    models: Sequence[nn.Module],
    how: str = "uniform",
    val_fn: Callable[[nn.Module], float] | None = None,
    *,
    masks: Sequence[MaskSet] | None = None,
    maximize: bool = True,
    recalibrate: Callable[[nn.Module], None] | None = None,
) -> SoupResult:
    """Average fine-tuned children of one sparse parent; the soup has the parent's masks.

    ``how="uniform"``: the mean of all models. ``how="greedy"``: needs ``val_fn(model) -> score``
    (held-out data; higher is better, or pass ``maximize=False`` for a loss or perplexity); the
    children are ranked by their own score and each is kept only if the soup's score with it is
    at least as good. The models are not changed; the soup is a new model.
    ``recalibrate(model)`` (optional) runs on every averaged model before it is scored and on
    the returned soup, e.g. to re-estimate BatchNorm statistics (SMS recalibrates BN on 20% of
    the training data: averaged running statistics do not match the averaged weights).
    """
    models = list(models)
    check_same_masks(models, masks)
    _check_how(how, val_fn)
    if how == "uniform":
        return SoupResult(_make(models, range(len(models)), recalibrate), list(range(len(models))))
    assert val_fn is not None

    def better(a: float, b: float) -> bool:  # a at least as good as b
        return a >= b if maximize else a <= b

    scores = [_score(m, val_fn) for m in models]
    order = sorted(range(len(models)), key=lambda i: -scores[i] if maximize else scores[i])
    used = [order[0]]
    best = scores[order[0]]
    if recalibrate is not None:  # the best child alone, recalibrated as every soup is
        best = _score(_make(models, used, recalibrate), val_fn)
    soup_scores = [best]
    for i in order[1:]:
        s = _score(_make(models, [*used, i], recalibrate), val_fn)
        if better(s, best):
            used.append(i)
            best = s
            soup_scores.append(s)
    return SoupResult(_make(models, used, recalibrate), used, scores, soup_scores)


def recalibrate_bn(batches: Callable[[], Any] | Sequence[Any],
                   forward: Callable[[nn.Module, Any], Any] | None = None) -> Callable[[nn.Module], None]:
    """A ``recalibrate=`` for :func:`soup` / :func:`iterative_sms` that re-estimates BatchNorm.

    Averaged weights come with averaged running statistics that do not match them (SMS
    recalibrates BN on a fraction of the training data). The returned function resets every
    ``_BatchNorm``'s running statistics and runs ``batches`` through the model in train mode
    without gradients, with ``momentum=None`` so that the statistics become the equal-weight
    average over the batches (PyTorch's cumulative average: the mean of the batch means and of
    the unbiased batch variances). Weights are not touched; each module's mode and momentum are
    restored. ``batches`` is a sequence, or a function returning a fresh iterable each call;
    ``forward(model, batch)`` defaults to ``model(batch)`` (or ``model(batch[0])`` for a tuple).
    A model without BatchNorm is left as it is.
    """
    if not (callable(batches) or isinstance(batches, Sequence)):
        raise SoupError(f"batches must be a sequence of inputs or a function returning an iterable, got "
                        f"{type(batches).__name__}")

    def run(model: nn.Module) -> None:
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if not bns:
            return
        modes = [(m, m.training) for m in model.modules()]
        momenta = [(m, m.momentum) for m in bns]
        n = 0
        try:
            for m in bns:
                m.reset_running_stats()
                m.momentum = None
            model.train()
            with torch.no_grad():
                for batch in (batches() if callable(batches) else batches):
                    if forward is not None:
                        forward(model, batch)
                    else:
                        model(batch[0] if isinstance(batch, (tuple, list)) else batch)
                    n += 1
        finally:
            for m, training in modes:
                m.training = training
            for m, momentum in momenta:
                m.momentum = momentum
        if n == 0:
            raise SoupError("recalibrate_bn got no batches: the BatchNorm statistics were reset and nothing "
                            "re-estimated them; pass at least one batch of training data")

    return run


def _check_how(how: str, val_fn: Callable[[nn.Module], float] | None) -> None:
    if how not in ("uniform", "greedy"):
        raise SoupError(f"how must be 'uniform' or 'greedy', got {how!r}")
    if how == "greedy" and val_fn is None:
        raise SoupError("a greedy soup needs val_fn(model) -> score on held-out data")


# ---------------------------------------------------------------------------------------------
# children of one parent, and iterative SMS


#: ``batch_fn(seed, i)``: micro-batch ``i`` of the data order drawn with ``seed`` (a pure function,
#: so a child's data order is fixed by its seed; module-level for ``processes > 1``)
SeededBatchFn = Callable[[int, int], Any]
LossFn = Callable[[nn.Module, Any], "tuple[Tensor, int]"]


@dataclass(frozen=True)
class ChildSetting:
    """How one child differs from its siblings.

    ``seed`` is the seed of the child's data order (``batch_fn(seed, i)``) and of its RNG
    (``FinetuneConfig.seed``); ``lr`` and ``weight_decay`` override the shared config's when
    given (SMS's ``ensemble_by``: seed, weight decay, ...).
    """

    seed: int
    lr: float | None = None
    weight_decay: float | None = None

    def config(self, base: FinetuneConfig) -> FinetuneConfig:
        """``base`` with this child's seed (and lr / weight decay); validated by FinetuneConfig."""
        return dataclasses.replace(
            base,
            seed=self.seed,
            lr=base.lr if self.lr is None else self.lr,
            weight_decay=base.weight_decay if self.weight_decay is None else self.weight_decay,
        )


@dataclass
class Child:
    """One fine-tuned child: its model, the setting it was trained with and the run's record."""

    model: nn.Module
    setting: ChildSetting
    result: FinetuneResult


def check_settings(settings: Sequence[ChildSetting], config: FinetuneConfig | None = None) -> list[ChildSetting]:
    """The settings as a list; SoupError when empty, not ChildSettings, or two are identical
    (identical settings train identical children: the soup would gain nothing from the copy).
    With ``config`` the comparison is on the resolved seed, lr and weight decay, and each
    child's config is validated (FinetuneError for e.g. a negative lr)."""
    if isinstance(settings, (str, bytes)) or not isinstance(settings, Sequence):
        raise SoupError(f"settings must be a list of ChildSetting, got {type(settings).__name__}")
    out = list(settings)
    if not out:
        raise SoupError("settings is empty: a soup needs k >= 1 children, e.g. "
                        "settings=[ChildSetting(seed=s) for s in range(4)]")
    for i, st in enumerate(out):
        if not isinstance(st, ChildSetting):
            raise SoupError(f"settings[{i}] is a {type(st).__name__}, not a ChildSetting; "
                            "write ChildSetting(seed=..., lr=None, weight_decay=None)")
        if isinstance(st.seed, bool) or not isinstance(st.seed, int):
            raise SoupError(f"settings[{i}].seed must be an integer, got {st.seed!r}")
    def key(st: ChildSetting) -> tuple[Any, ...]:
        if config is None:
            return (st.seed, st.lr, st.weight_decay)
        c = st.config(config)
        return (c.seed, c.lr, c.weight_decay)

    keys = [key(st) for st in out]
    for j, k in enumerate(keys):
        if k in keys[:j]:
            raise SoupError(f"settings[{keys.index(k)}] and settings[{j}] are identical ({out[j]}): their children "
                            "would be the same model; give each child its own seed (or lr / weight decay)")
    return out


def _check_processes(processes: int) -> int:
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise SoupError(f"processes must be a positive integer (1 = serial, the default), got {processes!r}")
    return processes


def _train_child(parent: nn.Module, masks: MaskSet, setting: ChildSetting, batch_fn: SeededBatchFn,
                 loss_fn: LossFn, config: FinetuneConfig, progress: bool, desc: str) -> Child:
    child = copy.deepcopy(parent)
    result = train_masked(child, masks, functools.partial(batch_fn, setting.seed), loss_fn,
                          setting.config(config), progress=progress, desc=desc, eval_before=False)
    return Child(child, setting, result)


def _child_worker(parent: nn.Module, mask_state: dict[str, Any], setting: ChildSetting,
                  batch_fn: SeededBatchFn, loss_fn: LossFn, config: FinetuneConfig,
                  threads: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Runs in a spawned process: train one child, return its weights and its record."""
    torch.set_num_threads(threads)
    masks = MaskSet(mask_state["masks"], mask_state["patterns"])
    child = _train_child(parent, masks, setting, batch_fn, loss_fn, config, False, "child")
    return child.model.state_dict(), child.result.to_dict()


def _train_parallel(parent: nn.Module, masks: MaskSet, settings: list[ChildSetting], batch_fn: SeededBatchFn,
                    loss_fn: LossFn, config: FinetuneConfig, processes: int) -> list[Child]:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing as tmp

    try:  # what spawn must send: fail here, with advice, not inside a worker
        ForkingPickler.dumps((batch_fn, loss_fn, config))
    except Exception as exc:  # noqa: BLE001 - any pickling failure means the same thing
        raise SoupError(f"processes={processes} sends batch_fn and loss_fn to spawned processes, but they cannot "
                        f"be sent ({exc}); define them at module level (functools.partial works) or use "
                        "processes=1") from None
    threads = max(1, torch.get_num_threads() // processes)
    state = {"masks": {n: m.cpu() for n, m in masks.masks.items()},
             "patterns": {n: str(p) for n, p in masks.patterns.items()}}
    with ProcessPoolExecutor(max_workers=min(processes, len(settings)), mp_context=tmp.get_context("spawn")) as ex:
        futures = [ex.submit(_child_worker, parent, state, st, batch_fn, loss_fn, config, threads) for st in settings]
        outs = [f.result() for f in futures]
    children = []
    for st, (sd, res) in zip(settings, outs):
        child = copy.deepcopy(parent)
        child.load_state_dict(sd)
        children.append(Child(child, st, FinetuneResult(**res)))
    return children


def train_children(
    parent: nn.Module,
    masks: MaskSet,
    settings: Sequence[ChildSetting],
    batch_fn: SeededBatchFn,
    loss_fn: LossFn,
    config: FinetuneConfig,
    *,
    processes: int = 1,
    progress: bool = False,
    desc: str = "child",
) -> list[Child]:
    """Fine-tune one child of ``parent`` per setting under ``masks``; the parent is not changed.

    Every child starts from a copy of ``parent`` and runs :func:`train_masked` with
    ``setting.config(config)`` on ``batch_fn(setting.seed, i)``, so the children share the
    parent's mask exactly (and can be souped) and differ only by their settings.
    ``processes > 1`` trains them in that many spawned processes (each with its share of
    torch's threads); ``batch_fn``, ``loss_fn`` and the model's class must then be importable
    (module-level). Serial is the default: on a small machine it is as fast and simpler.
    """
    if not isinstance(config, FinetuneConfig):
        raise SoupError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    settings = check_settings(settings, config)  # a bad lr / weight decay fails before any child trains
    _check_processes(processes)
    if not isinstance(masks, MaskSet):
        raise SoupError(f"masks must be the parent's MaskSet, got {type(masks).__name__}")
    if processes > 1 and len(settings) > 1:
        return _train_parallel(parent, masks, settings, batch_fn, loss_fn, config, processes)
    return [_train_child(parent, masks, st, batch_fn, loss_fn, config, progress, f"{desc} {i}")
            for i, st in enumerate(settings)]


def phase_sparsities(goal: float, phases: int) -> list[float]:
    """SMS/IMP phase targets ``1 - (1 - goal) ** (i / phases)``, i = 1..phases: every phase
    prunes the same fraction ``1 - (1 - goal) ** (1 / phases)`` of the weights still kept."""
    s = _check_sparsity(goal, "goal")
    if isinstance(phases, bool) or not isinstance(phases, int) or phases < 1:
        raise SoupError(f"phases must be a positive integer, got {phases!r}")
    out = [1.0 - (1.0 - s) ** (i / phases) for i in range(1, phases + 1)]
    out[-1] = s  # exactly the goal, not 0.8999999999999999
    return out


def _check_sparsity(s: Any, what: str) -> float:
    try:
        return check_sparsity(s, what)
    except SparsityValueError as exc:
        raise SoupError(str(exc)) from None


@torch.no_grad()
def prune_further(
    model: nn.Module,
    masks: MaskSet,
    sparsity: float,
    *,
    allocation: str = "global",
    pattern: Pattern | str | None = None,
) -> MaskSet:
    """A new MaskSet at ``sparsity`` that keeps the largest-magnitude weights still kept by ``masks``.

    Scores are ``|W|`` (the library's ``magnitude`` score) with already-pruned weights set to -1,
    split across layers by ``allocation`` (``"global"``: one threshold, SMS's default;
    ``"uniform"``, ``"erk"``, ``"er"``) and turned into masks by the pattern (default: each
    mask's own) with exact counts, so nothing pruned comes back. The model is not changed.
    Raises SoupError when the allocation would have to regrow a weight (a layer already sparser
    than its new share).
    """
    s = _check_sparsity(sparsity, "sparsity")
    method = allocation.lower() if isinstance(allocation, str) else allocation
    if method not in alloc.ALLOCATIONS:
        raise SoupError(f"allocation must be one of {', '.join(alloc.ALLOCATIONS)}, got {allocation!r}")
    named = dict(model.named_parameters())
    missing = [n for n in masks.masks if n not in named]
    if missing:
        raise SoupError(f"mask {missing[0]!r} names no parameter of {type(model).__name__}; the masks were made "
                        "for another model")
    params = {n: named[n].detach() for n in masks.masks}
    magnitude = get_score("magnitude")
    scores = {n: magnitude(p).float().masked_fill(~masks.masks[n].to(p.device), -1.0) for n, p in params.items()}
    if method == "global":
        per_layer = alloc.global_magnitude(params, s, scores=scores)
    else:
        per_layer = alloc.allocate(method, params, s)
    new = MaskSet.from_scores(scores, per_layer, pattern if pattern is not None else masks.patterns)
    for n, m in new.masks.items():
        old = masks.masks[n].to(m.device)
        if bool((m & ~old).any()):
            raise SoupError(
                f"{n}: pruning to sparsity {s:g} with allocation {allocation!r} would regrow weights the previous "
                f"mask pruned (the layer is at {1 - float(old.float().mean()):.4f}, its new share "
                f"{per_layer[n]:.4f}); use allocation='global' or a sparsity at least as high in every layer")
    return new


@dataclass
class PhaseRecord:
    """One SMS phase: its target and actual sparsity, the children's and the soup's val scores."""

    sparsity_target: float
    sparsity: float
    #: each child's val_fn score (empty without val_fn)
    child_scores: list[float]
    #: the soup's val_fn score (None without val_fn)
    soup_score: float | None
    #: indices of the children in the soup
    used: list[int]
    #: each child's final training loss
    child_losses: list[float | None]
    seconds: float
    #: the phase's masks (the next phase's lie inside them)
    masks: MaskSet = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The record as plain data (without the masks)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "masks"}


@dataclass
class SMSResult:
    """The final soup, its masks and one :class:`PhaseRecord` per phase."""

    model: nn.Module
    masks: MaskSet
    phases: list[PhaseRecord]


def iterative_sms(
    model: nn.Module,
    sparsities: Sequence[float],
    settings: Sequence[ChildSetting],
    batch_fn: SeededBatchFn,
    loss_fn: LossFn,
    config: FinetuneConfig,
    *,
    how: str = "greedy",
    val_fn: Callable[[nn.Module], float] | None = None,
    maximize: bool = True,
    masks: MaskSet | None = None,
    targets: str | Sequence[str] | None = None,
    ignore: str | Sequence[str] | None = None,
    allocation: str = "global",
    pattern: Pattern | str | None = None,
    recalibrate: Callable[[nn.Module], None] | None = None,
    processes: int = 1,
    progress: bool = False,
) -> SMSResult:
    """Iterative Sparse Model Soups: for each target in ``sparsities`` prune the current model
    further by magnitude (:func:`prune_further`), fine-tune one child per setting under the new
    mask (:func:`train_children`), and average them (:func:`soup`, ``how`` / ``val_fn``); the
    next phase starts from that soup. ``model`` is not changed.

    ``masks`` are the start's masks (default: ``MaskSet.from_model(model, targets, ignore)``,
    i.e. a dense model's all-True masks). ``sparsities`` must increase and start at or above
    the start's sparsity (``[s]`` at the start's own sparsity is plain, one-phase SMS);
    :func:`phase_sparsities` gives SMS's geometric schedule. Every phase's mask lies inside the
    previous one (pruning only removes) and the soup is exactly as sparse as that mask.
    Everything is checked before the first child trains.
    """
    if not isinstance(model, nn.Module):
        raise SoupError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    targets_list = _check_sparsities(sparsities)
    if not isinstance(config, FinetuneConfig):
        raise SoupError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    settings = check_settings(settings, config)
    _check_how(how, val_fn)
    _check_processes(processes)
    current = copy.deepcopy(model)
    masks = MaskSet.from_model(current, targets, ignore) if masks is None else masks
    if not isinstance(masks, MaskSet):
        raise SoupError(f"masks must be a sparsetorch.MaskSet (the start's masks) or None, got {type(masks).__name__}")
    start = masks.sparsity().overall
    if targets_list[0] < start - 1e-12:
        raise SoupError(f"the start is already at sparsity {start:.4f} but the first phase asks for "
                        f"{targets_list[0]:g}; phase sparsities must not go below the start's")
    phases: list[PhaseRecord] = []
    for ph, s in enumerate(targets_list):
        t0 = time.perf_counter()
        masks = prune_further(current, masks, s, allocation=allocation, pattern=pattern)
        masks.apply(current)
        children = train_children(current, masks, settings, batch_fn, loss_fn, config, processes=processes,
                                  progress=progress, desc=f"phase {ph + 1} child")
        models = [c.model for c in children]
        res = soup(models, how, val_fn, masks=[masks] * len(models), maximize=maximize, recalibrate=recalibrate)
        masks.verify(res.model)
        child_scores: list[float] = []
        soup_score: float | None = None
        if val_fn is not None:
            child_scores = res.scores if how == "greedy" else [_score(m, val_fn) for m in models]
            soup_score = res.soup_scores[-1] if how == "greedy" else _score(res.model, val_fn)
        phases.append(PhaseRecord(s, masks.sparsity().overall, child_scores, soup_score, res.used,
                                  [c.result.final_loss for c in children], time.perf_counter() - t0, masks))
        current = res.model
    return SMSResult(current, masks, phases)


def _check_sparsities(sparsities: Sequence[float]) -> list[float]:
    if isinstance(sparsities, (str, bytes)) or not isinstance(sparsities, Sequence) or not sparsities:
        raise SoupError(f"sparsities must be a non-empty list of phase targets in [0, 1), e.g. "
                        f"phase_sparsities(0.9, 3); got {sparsities!r}")
    out = [_check_sparsity(s, f"sparsities[{i}]") for i, s in enumerate(sparsities)]
    for i in range(1, len(out)):
        if out[i] <= out[i - 1]:
            raise SoupError(f"sparsities must increase phase by phase (pruning only removes), but "
                            f"sparsities[{i}]={out[i]:g} <= sparsities[{i - 1}]={out[i - 1]:g}")
    return out
