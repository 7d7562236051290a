"""Bad input gets a typed error that says what to do."""

import pytest

from sparsetorch.errors import MethodError, ScheduleError, SparsityValueError
from sparsetorch.training import get_method


def test_unknown_method_suggests_close_match():
    with pytest.raises(MethodError, match="rigl"):
        get_method("rigll", sparsity=0.9, total_steps=100)


@pytest.mark.parametrize("s", [1.0, 1.5, -0.1])
def test_sparsity_out_of_range(s):
    with pytest.raises(SparsityValueError):
        get_method("rigl", sparsity=s, total_steps=100)


def test_end_before_start():
    with pytest.raises(ScheduleError):
        get_method("rigl", sparsity=0.9, start=50, end=10)
    with pytest.raises(ScheduleError):
        get_method("gmp", sparsity=0.9, start=50, end=10)


def test_missing_total_steps_is_explained():
    with pytest.raises(MethodError, match="total_steps"):
        get_method("rigl", sparsity=0.9)


def test_unknown_allocation():
    with pytest.raises(MethodError, match="erk"):
        get_method("static", sparsity=0.9, allocation="erkk")


def test_data_methods_need_data(mlp):
    with pytest.raises(MethodError, match="data"):
        get_method("snip", sparsity=0.9).attach(mlp)


def test_step_before_attach():
    with pytest.raises(MethodError, match="attach"):
        get_method("static", sparsity=0.5).step()
