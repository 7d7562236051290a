"""Schedules: a sparsity, or an update fraction, as a pure function of the training step."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ScheduleError, check_sparsity


def _check_steps(start: int, end: int, frequency: int = 1) -> None:
    if start < 0:
        raise ScheduleError(f"start step must be >= 0, got {start}.")
    if end <= start:
        raise ScheduleError(
            f"end step ({end}) must be after start step ({start}); e.g. start=0, end=1000."
        )
    if frequency < 1:
        raise ScheduleError(f"frequency must be a positive number of steps, got {frequency}.")


@dataclass(frozen=True)
class Constant:
    """The same sparsity at every step."""

    sparsity: float

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)

    def __call__(self, step: int) -> float:
        return self.sparsity


@dataclass(frozen=True)
class _Ramp:
    initial: float
    final: float
    start: int
    end: int
    frequency: int = 1

    def __post_init__(self) -> None:
        check_sparsity(self.initial, "initial sparsity")
        check_sparsity(self.final, "final sparsity")
        _check_steps(self.start, self.end, self.frequency)

    def progress(self, step: int) -> float:
        """Fraction of the ramp done at the last update step <= ``step`` (clamped to [0, 1])."""
        if step <= self.start:
            return 0.0
        if step >= self.end:
            return 1.0
        last = self.start + ((step - self.start) // self.frequency) * self.frequency
        return (last - self.start) / (self.end - self.start)

    def is_update_step(self, step: int) -> bool:
        """True on the steps where masks should be recomputed: start, every ``frequency``, end."""
        if step < self.start or step > self.end:
            return False
        return (step - self.start) % self.frequency == 0 or step == self.end


@dataclass(frozen=True)
class Linear(_Ramp):
    """Sparsity rising linearly from ``initial`` at ``start`` to ``final`` at ``end``."""

    def __call__(self, step: int) -> float:
        p = self.progress(step)
        return self.initial + (self.final - self.initial) * p


@dataclass(frozen=True)
class Cubic(_Ramp):
    """Zhu & Gupta (2017): ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t_end - t0))**3``.

    Sparsity is held at its value from the last update step (every ``frequency`` steps).
    """

    exponent: float = 3.0

    def __call__(self, step: int) -> float:
        p = self.progress(step)
        return self.final + (self.initial - self.final) * (1.0 - p) ** self.exponent


@dataclass(frozen=True)
class CosineDecay:
    """RigL's update fraction ``alpha/2 * (1 + cos(pi * t / end))`` for ``t <= end``, 0 after."""

    alpha: float = 0.3
    end: int = 1
    start: int = 0

    def __post_init__(self) -> None:
        if not (0.0 < self.alpha <= 1.0):
            raise ScheduleError(f"update fraction alpha must be in (0, 1], got {self.alpha}.")
        _check_steps(self.start, self.end)

    def __call__(self, step: int) -> float:
        if step < self.start or step > self.end:
            return 0.0
        return self.alpha / 2.0 * (1.0 + math.cos(math.pi * step / self.end))


SCHEDULES = {"constant": Constant, "linear": Linear, "cubic": Cubic, "cosine": CosineDecay}
