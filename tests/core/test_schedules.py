from __future__ import annotations

import math

import pytest

from sparsetorch.errors import ScheduleError, SparsityValueError
from sparsetorch.schedules import Constant, CosineDecay, Cubic, Linear


@pytest.mark.parametrize("t", [0, 10, 25, 50, 75, 99, 100, 150])
def test_cubic_matches_zhu_gupta(t):
    sch = Cubic(initial=0.0, final=0.9, start=0, end=100)
    p = min(max(t / 100, 0.0), 1.0)
    assert sch(t) == pytest.approx(0.9 + (0.0 - 0.9) * (1 - p) ** 3)


def test_cubic_holds_between_updates_and_is_monotone():
    sch = Cubic(0.0, 0.8, start=10, end=110, frequency=20)
    assert sch(5) == 0.0
    assert sch(35) == sch(30)  # held from the last update step (30)
    vals = [sch(t) for t in range(0, 130)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    assert sch.is_update_step(30) and not sch.is_update_step(35) and sch.is_update_step(110)


def test_linear_and_constant():
    assert Linear(0.2, 0.6, 0, 4)(2) == pytest.approx(0.4)
    assert Constant(0.3)(12345) == 0.3


def test_cosine_update_fraction():
    sch = CosineDecay(alpha=0.3, end=100)
    assert sch(0) == pytest.approx(0.3)
    assert sch(50) == pytest.approx(0.15)
    assert sch(100) == pytest.approx(0.0, abs=1e-12)
    assert sch(101) == 0.0
    assert sch(25) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))


def test_bad_schedules():
    with pytest.raises(ScheduleError, match="end step"):
        Cubic(0.0, 0.5, start=100, end=50)
    with pytest.raises(ScheduleError):
        Cubic(0.0, 0.5, start=0, end=50, frequency=0)
    with pytest.raises(SparsityValueError):
        Cubic(0.0, 1.0, start=0, end=50)
