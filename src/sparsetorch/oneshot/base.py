"""The solver interface: pure tensor functions behind a thin, validated class.

A solver turns one layer's weight (as ``[out, in]`` fp32) and its input statistics into a new
weight and a keep-mask (True = kept). :meth:`Solver.apply` is the only place in ``oneshot/``
that writes model weights, and it does so under ``torch.no_grad()``.
"""

from __future__ import annotations

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


class Solver:
    """Base class: ``needs`` names the statistics (see :mod:`.stats`); ``solve`` is pure.

    Every solver also accepts ``refit`` (conjugate-gradient iterations; ``default_refit``, 0 = off
    except for SparseGPT): after the solver picks its mask, the kept weights are re-solved to
    reproduce the dense layer's output on the calibration inputs (:func:`.refit.refit_masked`);
    this needs ``XXᵀ``.
    """

    name: ClassVar[str] = "solver"
    needs: ClassVar[frozenset[str]] = frozenset()
    options: ClassVar[tuple[str, ...]] = ()
    common_options: ClassVar[tuple[str, ...]] = ("refit",)
    default_refit: ClassVar[int] = 0

    def __init__(self, **options: Any) -> None:
        allowed = self.options + self.common_options
        unknown = set(options) - set(allowed)
        if unknown:
            raise MethodError(
                f"{self.name} got unknown option(s) {sorted(unknown)}; it accepts {list(allowed)}."
            )
        refit = options.pop("refit", self.default_refit)
        if isinstance(refit, bool) or not isinstance(refit, int) or refit < 0:
            raise MethodError(f"refit must be a number of iterations >= 0 (e.g. 20), got {refit!r}.")
        self.refit = refit
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
