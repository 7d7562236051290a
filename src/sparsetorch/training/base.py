"""The ``Sparsifier`` lifecycle shared by every training-time method, and the method registry.

Plain loop (three lines)::

    sp = get_method("rigl", sparsity=0.9, total_steps=len(loader) * epochs)   # create
    sp.attach(model, optimizer)                                                  # attach
    for x, y in loader:
        loss_fn(model(x), y).backward(); optimizer.step(); optimizer.zero_grad()
        sp.step()                                                                # after optimizer.step()

``step()`` counts optimizer steps: after the ``t``-th call ``sp.step_count == t`` and updates
"at step t" happen inside that call. Masks live in a :class:`~sparsetorch.masks.MaskSet`;
pruned weights are kept at exactly zero by ``MaskSet.enforce`` (gradient hooks plus a post-step
re-zero on the optimizer), so a Sparsifier only changes masks through ``MaskSet.set``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import allocation as alloc
from ..errors import MethodError, SparsityValueError, TargetError, check_sparsity, close_matches
from ..masks import MaskSet, _is_sharded, _place_like
from ..patterns import n_pruned, topk_mask
from ..targets import select

METHODS: dict[str, type[Sparsifier]] = {}

Batches = Iterable[Any]


def register_method(name: str) -> Callable[[type[Sparsifier]], type[Sparsifier]]:
    """Class decorator adding a Sparsifier to :data:`METHODS` under ``name``."""

    def deco(cls: type[Sparsifier]) -> type[Sparsifier]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def get_method(name: str, **kwargs: Any) -> Sparsifier:
    """Build a registered training method by name, e.g. ``get_method("rigl", sparsity=0.9)``."""
    from . import _load_all

    _load_all()
    key = str(name).lower().replace("-", "_")
    cls = METHODS.get(key)
    if cls is None:
        raise MethodError(
            f"unknown training method {name!r}; available: {', '.join(sorted(METHODS))}."
            + close_matches(key, METHODS)
        )
    return cls(**kwargs)


@torch.no_grad()
def reset_optimizer_state(optimizer: torch.optim.Optimizer | None, param: Tensor, where: Tensor) -> None:
    """Zero every per-element optimizer state (momentum, Adam moments ...) of ``param`` at ``where``.

    Works for any ``torch.optim`` optimizer: every state tensor shaped like the parameter is reset.
    """
    if optimizer is None or not bool(where.any()):
        return
    st = optimizer.state.get(param)
    if not st:
        return
    for v in st.values():
        if isinstance(v, Tensor) and v.shape == param.shape:
            v.masked_fill_(where.to(v.device), 0)


def _unpack(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, Mapping):
        return batch.get("input", batch.get("x")), batch.get("labels", batch.get("y"))
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise MethodError("data batches must be (inputs, targets) pairs or dicts with 'x'/'y'.")


def _placed(masks: MaskSet, params: Mapping[str, Tensor]) -> MaskSet:
    """``masks`` with every mask placed like its parameter (FSDP2 shards; see ``_place_like``)."""
    if not any(_is_sharded(p) for p in params.values()):
        return masks
    return MaskSet({n: _place_like(m, params[n]) for n, m in masks.items()}, dict(masks.patterns))


def _local(t: Tensor) -> Tensor:
    """One process: a statistic is already the average over all the data seen."""
    return t


class Sparsifier:
    """Base class: owns a MaskSet for the targeted weights of one model and updates it while training.

    Args:
        sparsity: target fraction of zeros over the targeted weights, in [0, 1).
        allocation: how ``sparsity`` splits across layers: ``"erk"``, ``"er"``, ``"uniform"`` or
            ``"global"`` (see :mod:`sparsetorch.allocation`), or an explicit ``{name: sparsity}``
            for every targeted weight (e.g. from :mod:`sparsetorch.regularize.search`); a schedule
            that asks for a lower global sparsity scales it proportionally.
        targets, ignore: parameter selectors (see :func:`sparsetorch.targets.select`).
        dense: parameter names kept dense by the allocation; the tokens ``"first"`` and ``"last"``
            name the first / last targeted weight in model order (the RigL reference keeps the
            first conv dense for uniform allocation, and for ERK at very high sparsity). ERK
            already makes tiny layers dense on its own when their density would exceed 1.
        seed: seed of the method's own random generator (saved in ``state_dict``).
        total_steps: number of optimizer steps of the whole run (needed by scheduled methods).
    """

    name: ClassVar[str] = "base"
    #: whether the method needs a data iterable in :meth:`attach`
    needs_data: ClassVar[bool] = False

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        allocation: str | Mapping[str, float] = "erk",
        targets: str | Sequence[str] | None = None,
        ignore: str | Sequence[str] | None = None,
        dense: str | Sequence[str] = (),
        seed: int = 0,
        total_steps: int | None = None,
    ) -> None:
        self.sparsity = check_sparsity(sparsity)
        #: an explicit per-layer allocation ({name: sparsity}), checked against the targets at attach
        self.layer_allocation: dict[str, float] | None = None
        if isinstance(allocation, Mapping):
            self.layer_allocation = {str(k): check_sparsity(v, f"allocation[{k!r}]") for k, v in allocation.items()}
            allocation = "explicit"
        elif not isinstance(allocation, str) or allocation.lower() not in alloc.ALLOCATIONS:
            raise MethodError(
                f"unknown allocation {allocation!r}; available: {', '.join(alloc.ALLOCATIONS)}, or a "
                "{name: sparsity} mapping." + close_matches(str(allocation), alloc.ALLOCATIONS)
            )
        self.allocation = allocation.lower()
        self.targets = targets
        self.ignore = ignore
        self.dense = (dense,) if isinstance(dense, str) else tuple(dense)
        self.seed = int(seed)
        if total_steps is not None and int(total_steps) < 1:
            raise MethodError(f"total_steps must be a positive number of optimizer steps, got {total_steps}.")
        self.total_steps = None if total_steps is None else int(total_steps)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.step_count = 0
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.masks: MaskSet | None = None
        self.params: dict[str, nn.Parameter] = {}
        #: (step, {layer: sparsity}) recorded after attach and after every mask change
        self.history: list[tuple[int, dict[str, float]]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        #: per-element state kept outside the optimizer (a communication hook's residuals / moments)
        #: that must not outlive a mask change; see :meth:`on_mask_change`
        self._state_resets: list[Callable[[Tensor, Tensor], None]] = []
        #: averages a data-dependent statistic (RigL's dense gradient, SNFS's momentum) over
        #: data-parallel workers before a mask decision; the identity on one process.
        #: :func:`sparsetorch.distributed.attach` sets an all-reduce mean, so every rank decides
        #: from the same numbers and the masks stay identical.
        self.average: Callable[[Tensor], Tensor] = _local

    # ------------------------------------------------------------------ lifecycle
    def attach(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        data: Batches | None = None,
    ) -> MaskSet:
        """Choose the initial masks, zero pruned weights and start keeping them at zero.

        ``data`` is an iterable of ``(inputs, targets)`` batches, used by data-dependent
        pruning at initialisation (SNIP, GraSP; SynFlow takes only the input shape from it).
        """
        if self.model is not None:
            raise MethodError(f"{self.name} is already attached to a model; call detach() first.")
        if self.needs_data and data is None and not self._has_data_fallback():
            raise MethodError(
                f"{self.name} scores weights on data: pass attach(model, optimizer, data=[(x, y), ...])."
            )
        self.model, self.optimizer = model, optimizer
        self.params = select(model, self.targets, self.ignore)
        self.params = self._filter_params(self.params)
        with torch.no_grad():
            self.masks = _placed(self._initial_masks(data), self.params)
        # the method's hooks first: a post-accumulate hook of its own (RigL under FSDP2) must see
        # the gradient before MaskSet's hook masks it
        self._install_hooks()
        self._enforce()
        self._record()
        return self.masks

    def step(self) -> bool:
        """Call once after every ``optimizer.step()``. Returns True when the masks changed."""
        self._check_attached()
        self.step_count += 1
        with torch.no_grad():
            changed = bool(self._update(self.step_count))
        if changed:
            self._record()
        return changed

    def detach(self) -> MaskSet:
        """Stop enforcing masks and remove every hook; the model keeps its zeros. Returns the masks."""
        self._check_attached()
        assert self.masks is not None
        self.masks.release()
        for h in self._handles:
            h.remove()
        self._handles = []
        self._on_detach()
        masks = self.masks
        self.model = self.optimizer = None
        return masks

    def on_mask_change(self, reset: Callable[[Tensor, Tensor], None]) -> None:
        """Call ``reset(param, where)`` whenever a mask of ``param`` changes (``where``: the bool
        positions that were just grown, plus every position now pruned) and when the method resets
        all of a weight's state (``where`` all True).

        Why: the optimizer's state of grown weights is reset here already, but state kept
        elsewhere -- e.g. a top-k communication hook's error-feedback residual and Adam moments
        (:meth:`sparsetorch.distributed.hooks.TopKState.reset`) -- would otherwise hand a grown
        weight what its pruned predecessor left, and keep spending bandwidth on dropped ones.
        IMP calls it at its pruning rounds (``where``: the pruned positions, or everything when it
        rewinds the weights). Methods that keep training pruned weights in a dense shadow (the N:M
        STE methods, N:M decay) do not call it: there a pruned weight's gradient is live state.
        Callbacks are not saved with :meth:`state_dict`: register them again after a resume.
        """
        if not callable(reset):
            raise MethodError(f"on_mask_change needs a callable reset(param, where), got {type(reset).__name__}.")
        self._state_resets.append(reset)

    def _reset_state(self, p: Tensor, grown: Tensor, where: Tensor) -> None:
        """Reset the optimizer state of ``grown`` positions and every registered state at ``where``."""
        reset_optimizer_state(self.optimizer, p, grown)
        self._reset_registered(p, where)

    def _reset_registered(self, p: Tensor, where: Tensor) -> None:
        """Call every :meth:`on_mask_change` callback of ``p`` at ``where`` (nothing when empty)."""
        if self._state_resets and bool(where.any()):
            for reset in self._state_resets:
                reset(p, where)

    def needs_dense_grad(self) -> bool:
        """True when the next backward must keep the dense (unmasked) gradient (RigL update steps)."""
        return False

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: step, masks, RNG state and method-specific buffers."""
        self._check_attached()
        assert self.masks is not None
        return {
            "method": self.name,
            "step": self.step_count,
            "masks": self.masks.state_dict(),
            "rng": self.generator.get_state(),
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output into an attached Sparsifier (same model layout)."""
        self._check_attached()
        assert self.masks is not None
        if state.get("method", self.name) != self.name:
            raise MethodError(f"state was saved by method {state.get('method')!r}, not {self.name!r}.")
        self.masks.load_state_dict(state["masks"])
        self.step_count = int(state["step"])
        self.generator.set_state(state["rng"])
        self._load_extra_state(state.get("extra", {}))
        self._enforce()

    # ------------------------------------------------------------------ reporting
    def layer_sparsity(self) -> dict[str, float]:
        """Current sparsity of each masked tensor."""
        self._check_attached()
        assert self.masks is not None
        return dict(self.masks.sparsity().per_layer)

    def sparsity_actual(self) -> float:
        """Overall fraction of zeros in the masks."""
        assert self.masks is not None
        return self.masks.sparsity().overall

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sparsity={self.sparsity}, allocation={self.allocation!r})"

    # ------------------------------------------------------------------ hooks for subclasses
    def _has_data_fallback(self) -> bool:
        return False

    def _filter_params(self, params: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
        return params

    def _initial_masks(self, data: Batches | None) -> MaskSet:
        """Default: random masks at the allocated per-layer sparsities (the static/ERK baseline)."""
        sp = self._layer_sparsities(self.sparsity)
        return MaskSet({n: self._random_mask(p, sp[n]) for n, p in self.params.items()})

    def _update(self, step: int) -> bool:
        return False

    def _install_hooks(self) -> None:
        pass

    def _on_detach(self) -> None:
        pass

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, extra: Mapping[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ helpers
    def _enforce(self) -> None:
        assert self.masks is not None and self.model is not None
        self.masks.enforce(self.model, self.optimizer)

    def _check_attached(self) -> None:
        if self.model is None or self.masks is None:
            raise MethodError(f"{self.name} is not attached: call attach(model, optimizer) first.")

    def _record(self) -> None:
        if self.masks is not None:
            self.history.append((self.step_count, dict(self.masks.sparsity().per_layer)))

    def _layer_sparsities(self, sparsity: float, scores: Mapping[str, Tensor] | None = None) -> dict[str, float]:
        """Per-layer sparsities for a global ``sparsity`` under this method's allocation."""
        if self.layer_allocation is not None:
            return self._explicit_sparsities(sparsity)
        shapes = {n: p.detach() for n, p in self.params.items()}
        dense = self.dense_names()
        if self.allocation == "global":
            return alloc.global_magnitude(shapes, sparsity, scores=scores, dense=dense)
        return alloc.allocate(self.allocation, shapes, sparsity, dense=dense)

    def _explicit_sparsities(self, sparsity: float) -> dict[str, float]:
        """The explicit allocation, scaled by ``sparsity / self.sparsity`` (a schedule's lower target)."""
        assert self.layer_allocation is not None
        given, names = set(self.layer_allocation), set(self.params)
        if given != names:
            missing, extra = sorted(names - given), sorted(given - names)
            raise TargetError(
                f"{self.name}: the explicit allocation must name every targeted weight exactly; "
                + (f"missing {missing[:3]}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"unknown {extra[:3]}" + close_matches(extra[0], names) if extra else "")
                + ". Build it for the same model and targets."
            )
        f = sparsity / self.sparsity if self.sparsity > 0 else 0.0
        return {n: min(self.layer_allocation[n] * f, 1.0 - 1e-12) for n in self.params}

    def dense_names(self) -> tuple[str, ...]:
        """``dense`` with the ``"first"``/``"last"`` tokens resolved to targeted weight names."""
        names = list(self.params)
        out: list[str] = []
        for d in self.dense:
            key = d.lower() if isinstance(d, str) else d
            if key in ("first", "last"):
                if not names:
                    raise MethodError(f"dense={d!r}: {self.name} targets no weights.")
                d = names[0] if key == "first" else names[-1]
            if d not in out:
                out.append(d)
        return tuple(out)

    def _random_mask(self, p: Tensor, sparsity: float) -> Tensor:
        """Exactly ``numel - floor(s * numel)`` kept positions, uniformly at random."""
        scores = torch.rand(p.shape, generator=self.generator)
        keep = p.numel() - n_pruned(sparsity, p.numel())
        return topk_mask(scores.reshape(-1), keep).reshape(p.shape).to(p.device)

    def _masks_from_scores(self, scores: Mapping[str, Tensor], sparsity: float) -> MaskSet:
        """Masks keeping the highest scores at the allocated per-layer sparsities (exact counts)."""
        sp = self._layer_sparsities(sparsity, scores=scores)
        return MaskSet.from_scores({n: s.to(self.params[n].device) for n, s in scores.items()}, sp)

    @torch.no_grad()
    def _set_mask(self, name: str, new: Tensor) -> Tensor:
        """Replace one mask; zero dropped weights, zero grown weights and reset their optimizer state
        (and the state registered with :meth:`on_mask_change` at grown and pruned positions).

        Returns the bool tensor of newly grown positions (``new & ~old``).
        """
        assert self.masks is not None
        p = self.params[name]
        new = _place_like(new, p)
        old = self.masks[name]
        grown = new & ~old
        p.masked_fill_(~new, 0)
        p.masked_fill_(grown, 0)
        self._reset_state(p, grown, grown | ~new)
        self.masks.set(name, new)
        return grown


def check_steps(start: int, end: int, what: str = "update") -> None:
    """Typed error for an ``end`` step that is not after ``start``."""
    from ..errors import ScheduleError

    if start < 0:
        raise ScheduleError(f"{what} start step must be >= 0, got {start}.")
    if end <= start:
        raise ScheduleError(f"{what} end step ({end}) must be after its start step ({start}).")


def require_total_steps(sp: Sparsifier, what: str) -> int:
    """Return ``sp.total_steps`` or raise a MethodError explaining why it is needed."""
    if sp.total_steps is None:
        raise MethodError(
            f"{sp.name} needs total_steps (optimizer steps of the whole run) to place {what}; "
            "pass total_steps=len(loader) * epochs, or give the step explicitly."
        )
    return sp.total_steps


def ceil_int(x: float) -> int:
    return int(math.ceil(x - 1e-9))


__all__ = [
    "METHODS",
    "Sparsifier",
    "SparsityValueError",
    "get_method",
    "register_method",
    "reset_optimizer_state",
]
