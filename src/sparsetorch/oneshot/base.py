"""The solver interface: pure tensor functions behind a thin, validated class.

A solver turns one layer's weight (as ``[out, in]`` fp32) and its input statistics into a new
weight and a keep-mask (True = kept). :meth:`Solver.apply` is the only place in ``oneshot/``
that writes model weights, and it does so under ``torch.no_grad()``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import MethodError, PatternError
from ..patterns import NM, Pattern
from .stats import InputStats


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D`` stores its weight as ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def weight_2d(module: nn.Module) -> Tensor:
    """The layer's weight as ``[out, in]`` fp32 (a copy)."""
    w = module.weight.detach()
    if is_conv1d(module):
        w = w.t()
    return w.float().contiguous().clone(memory_format=torch.contiguous_format)


@dataclass(frozen=True)
class Option:
    """What one method/pipeline option accepts; :func:`check_options` applies it.

    ``kind`` is ``int``, ``float``, ``bool``, ``str``, ``"regex"`` or ``"floats"`` (a list of
    numbers). Numbers must lie in ``[low, high]`` (``low_open``: strictly above ``low``) and be
    finite; strings must be one of ``choices`` when given. One declaration per option, shared by
    every solver and the pipeline, so a bad value (``blocksize=0``, ``percdamp=nan``) is rejected
    once, up front, before any model or calibration work.
    """

    kind: Any
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] | None = None
    hint: str = ""

    def check(self, owner: str, name: str, value: Any) -> Any:
        """Return ``value`` normalised (lower-cased choice, float) or raise MethodError."""
        what = f"{owner} option {name}"
        hint = f" ({self.hint})" if self.hint else ""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise MethodError(f"{what} must be true or false, got {value!r}{hint}.")
            return value
        if self.kind in (int, float):
            ok = isinstance(value, int) if self.kind is int else isinstance(value, int | float)
            if isinstance(value, bool) or not ok:
                kind = "an integer" if self.kind is int else "a number"
                raise MethodError(f"{what} must be {kind}, got {value!r}{hint}.")
            if self.kind is float:
                value = float(value)
                if not math.isfinite(value):
                    raise MethodError(f"{what} must be a finite number, got {value!r}{hint}.")
            self._check_range(what, value, hint)
            return value
        if self.kind == "floats":
            if value is None:
                return None
            items = list(value) if isinstance(value, list | tuple) else None
            if not items or any(isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
                                for v in items):
                raise MethodError(f"{what} must be a non-empty list of finite numbers, got {value!r}{hint}.")
            return [float(v) for v in items]
        if not isinstance(value, str) or not value.strip():
            raise MethodError(f"{what} must be a non-empty string, got {value!r}{hint}.")
        if self.kind == "regex":
            try:
                re.compile(value)
            except re.error as exc:
                raise MethodError(f"{what} is not a valid regular expression ({exc}): {value!r}.") from None
            return value
        low = value.strip().lower()
        if self.choices is not None and low not in self.choices:
            raise MethodError(f"{what} must be one of {', '.join(self.choices)}; got {value!r}.")
        return low

    def _check_range(self, what: str, value: float, hint: str) -> None:
        lo, hi = self.low, self.high
        if lo is not None and (value <= lo if self.low_open else value < lo):
            raise MethodError(f"{what} must be {'>' if self.low_open else '>='} {lo:g}, got {value!r}{hint}.")
        if hi is not None and value > hi:
            raise MethodError(f"{what} must be <= {hi:g}, got {value!r}{hint}.")


def check_options(owner: str, specs: Mapping[str, Option], values: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``values`` against ``specs`` (unknown names, types, ranges); return them normalised."""
    unknown = sorted(set(values) - set(specs))
    if unknown:
        raise MethodError(f"{owner} got unknown option(s) {unknown}; it accepts {sorted(specs)}.")
    return {k: specs[k].check(owner, k, v) for k, v in values.items()}


#: options every solver accepts (see :class:`Solver`)
COMMON_OPTIONS: dict[str, Option] = {
    "refit": Option(int, low=0, high=10_000, hint="conjugate-gradient iterations, e.g. 20; 0 = off"),
}

#: options of the block-sequential pipeline (:func:`sparsetorch.oneshot.run_oneshot`)
PIPELINE_OPTION_SPECS: dict[str, Option] = {
    "true_sequential": Option(bool),
    "batch_size": Option(int, low=1, high=1 << 20, hint="calibration sequences per forward"),
    "reconstruct": Option(bool),
    "reconstruct_steps": Option(int, low=0, high=1 << 20),
    "reconstruct_lr": Option(float, low=0, low_open=True, high=1.0),
    "reconstruct_target": Option(str, choices=("dense", "local")),
    "reconstruct_train": Option(str, choices=("masked", "all")),
    "owl_m": Option(float, low=0, low_open=True, hint="outlier threshold: times the mean score"),
    "owl_lambda": Option(float, low=0, high=1.0),
    "sensitivity_grid": Option("floats"),
    "sensitivity_samples": Option(int, low=1, high=1 << 20),
    "progress": Option(bool),
}


class Solver:
    """Base class: ``needs`` names the statistics (see :mod:`.stats`); ``solve`` is pure.

    Every solver also accepts ``refit`` (conjugate-gradient iterations; ``default_refit``, 0 = off
    except for SparseGPT): after the solver picks its mask, the kept weights are re-solved to
    reproduce the dense layer's output on the calibration inputs (:func:`.refit.refit_masked`);
    this needs ``XXᵀ``.
    """

    name: ClassVar[str] = "solver"
    needs: ClassVar[frozenset[str]] = frozenset()
    #: the solver's own options and what each accepts (validated by :func:`check_options`)
    option_specs: ClassVar[dict[str, Option]] = {}
    default_refit: ClassVar[int] = 0

    @classmethod
    def all_option_specs(cls) -> dict[str, Option]:
        """The solver's options plus the common ones (``refit``)."""
        return {**cls.option_specs, **COMMON_OPTIONS}

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Validate option names and values without building the solver (no model needed)."""
        return check_options(cls.name, cls.all_option_specs(), options)

    def __init__(self, **options: Any) -> None:
        options = self.check_options(options)
        self.refit = options.pop("refit", self.default_refit)
        self.opts = options

    def needs_for(self, layer_name: str) -> frozenset[str]:
        return self.needs | {"xtx"} if self.refit else self.needs

    def solve(
        self,
        weight: Tensor,
        stats: InputStats | None,
        sparsity: float,
        pattern: Pattern,
        *,
        name: str = "",
    ) -> tuple[Tensor, Tensor]:
        """Return ``(new_weight, keep_mask)`` for ``weight`` [out, in]; must not mutate inputs."""
        raise NotImplementedError

    @torch.no_grad()
    def apply(
        self,
        module: nn.Module,
        stats: InputStats | None,
        sparsity: float,
        pattern: Pattern,
        *,
        name: str = "",
    ) -> Tensor:
        """Solve and write the result into ``module.weight``; returns the mask in the weight's layout."""
        if is_conv1d(module) and isinstance(pattern, NM):
            raise PatternError(
                f"{name}: N:M on a transformers Conv1D layer (GPT-2 style, weight [in, out]) is not supported; "
                "ignore it or use an unstructured pattern."
            )
        w = weight_2d(module)
        new_w, keep = self.solve(w, stats, sparsity, pattern, name=name)
        new_w = new_w.masked_fill(~keep, 0.0)
        if self.refit:
            from .refit import refit_masked

            if stats is None or stats.xtx is None:
                raise MethodError(f"{name}: refit needs calibration statistics (XXᵀ); pass calibration data.")
            new_w, info = refit_masked(
                w, new_w, keep, stats.hessian(), iters=self.refit,
                percdamp=float(self.opts.get("percdamp", self.opts.get("dampening_frac", 0.01))),
            )
            self.last_info = {**(getattr(self, "last_info", None) or {}), "refit": info}
        if is_conv1d(module):
            new_w, keep = new_w.t(), keep.t()
        module.weight.copy_(new_w.to(module.weight.dtype))
        return keep.contiguous()
