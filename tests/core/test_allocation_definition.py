"""Allocations against hand-worked numbers, for the cases mutation testing found unchecked."""

from __future__ import annotations

import math

import pytest
import torch

from sparsetorch.allocation import (
    er,
    erdos_renyi,
    erk,
    global_magnitude,
    mean_sparsity,
    owl,
    uniform,
)
from sparsetorch.errors import AllocationError, TargetError


def test_mean_sparsity_counts_floor_zeros_over_all_weights() -> None:
    assert mean_sparsity({"a": (10,), "b": (30,)}, {"a": 0.55, "b": 0.5}) == pytest.approx((5 + 15) / 40)
    assert mean_sparsity({}, {}) == 0.0
    assert mean_sparsity({"a": (1,)}, {"a": 0.0}) == 0.0


def test_dense_names_are_checked_by_every_allocation() -> None:
    for fn in (uniform, erk, er, global_magnitude):
        params = {"a": torch.randn(4, 4), "b": torch.randn(4, 4)}
        with pytest.raises(TargetError, match=r"^dense names unknown layer 'c'\."):
            fn(params, 0.5, dense=["c"])


def test_erk_is_the_kernel_variant_and_er_is_not() -> None:
    shapes = {"conv": (8, 4, 3, 3), "fc": (10, 72)}
    assert erk(shapes, 0.8) == erdos_renyi(shapes, 0.8)  # kernel=True is ERK's default
    assert erk(shapes, 0.8) == erdos_renyi(shapes, 0.8, kernel=True)
    assert er(shapes, 0.8) == erdos_renyi(shapes, 0.8, kernel=False)
    assert er(shapes, 0.8) != erk(shapes, 0.8)
    assert er(shapes, 0.8, power_scale=0.5) == er(shapes, 0.8)  # ER has no power scale: ignored
    assert er(shapes, 0.5, dense=["conv"])["conv"] == 0.0  # other options still pass through


def test_er_on_1d_params_gets_raw_density_one() -> None:
    # one 2-D layer (raw (4+4)/16 = 0.5) and a 1-D one (raw 1.0): densities 1 - eps*raw
    shapes = {"w": (4, 4), "b": (16,)}
    out = er(shapes, 0.5)
    # kept 32*(1-0.5) = 16 = 16*eps*0.5 + 16*eps*1.0  ->  eps = 2/3; sparsity = 1 - eps*raw
    assert out["w"] == pytest.approx(2 / 3) and out["b"] == pytest.approx(1 / 3)


def test_erk_sparsity_zero_is_all_dense() -> None:
    assert erk({"a": (4, 4), "b": (8, 4)}, 0.0) == {"a": 0.0, "b": 0.0}


def test_erk_that_cannot_reach_the_budget_says_so() -> None:
    with pytest.raises(AllocationError, match=r"they alone hold more non-zeros than the budget allows\. Lower the sparsity or make fewer layers dense\."):
        erk({"a": (100, 100), "b": (2, 2)}, 0.9, dense=["a"])


def test_erk_layer_sparsities_stay_below_one_and_dense_layers_at_zero() -> None:
    shapes = {"tiny": (2, 2), "big": (512, 512)}
    out = erk(shapes, 0.95, dense=["tiny"])
    assert out["tiny"] == 0.0 and 0.0 < out["big"] < 1.0


def test_global_uses_the_given_scores_not_the_weights() -> None:
    w = {"a": torch.ones(2, 4), "b": torch.ones(2, 4)}
    scores = {"a": torch.zeros(2, 4), "b": torch.arange(8.0).view(2, 4)}
    out = global_magnitude(w, 0.5, scores=scores)
    # 8 zeros from 16; every layer keeps its best weight first: 'a' keeps 1, 'b' keeps 7
    assert out == {"a": 7 / 8, "b": 1 / 8}


def test_global_each_layer_keeps_its_own_best_weight() -> None:
    w = {"a": torch.tensor([0.1, 0.2, 0.3]), "b": torch.tensor([5.0, 6.0, 7.0, 8.0]), "c": torch.tensor([0.05])}
    out = global_magnitude(w, 0.5)  # 8 weights, 4 zeros: a keeps 0.3, c keeps 0.05, b keeps 8 and 7
    assert out == {"a": 2 / 3, "b": 2 / 4, "c": 0.0}


def test_global_dense_layers_are_zero_and_the_budget_counts_them() -> None:
    w = {"d": torch.ones(4), "x": torch.arange(1.0, 9.0)}
    out = global_magnitude(w, 0.5, dense=["d"])  # 12 weights -> 6 zeros, all from x
    assert out == {"d": 0.0, "x": 6 / 8}


def test_global_too_few_kept_weights_for_the_layers() -> None:
    w = {"d": torch.ones(6), "a": torch.ones(2), "b": torch.ones(2)}
    # 10 weights at 0.7 -> 7 zeros from a pool of 4: 4 - 7 < 2 layers
    with pytest.raises(AllocationError, match=r"would leave fewer kept weights \(-3\) than layers \(2\)"):
        global_magnitude(w, 0.7, dense=["d"])
    # exactly one kept weight per layer is enough: 10 at 0.2 -> 2 zeros from 4
    assert global_magnitude(w, 0.2, dense=["d"]) == {"d": 0.0, "a": 0.5, "b": 0.5}
    with pytest.raises(AllocationError, match=r"^global allocation has no layers left after 'dense'\.$"):
        global_magnitude({"d": torch.ones(3)}, 0.5, dense=["d"])


def test_global_nan_scores_rank_last_for_the_kept_best() -> None:
    w = {"a": torch.tensor([float("nan"), 0.5, 0.1]), "b": torch.tensor([9.0, 8.0, 7.0])}
    out = global_magnitude(w, 0.5)  # 6 weights, 3 zeros; a's best is 0.5 (not the NaN)
    assert out["a"] == pytest.approx(2 / 3) and out["b"] == pytest.approx(1 / 3)


def test_owl_definition_default_lambda_and_messages() -> None:
    d = [1.0, 3.0, 2.0]
    out = owl(d, 0.5)  # lam 0.08: r = [0, 0.16, 0.08], mean 0.08 -> sparsity 0.5 + 0.08 - r
    assert out == pytest.approx([0.58, 0.42, 0.5])
    assert owl(d, 0.5, lam=0.0) == pytest.approx([0.5, 0.5, 0.5])  # lambda 0 is allowed: uniform
    assert owl({"x": 1.0, "y": 1.0}, 0.6) == pytest.approx({"x": 0.6, "y": 0.6})  # no spread: uniform
    with pytest.raises(AllocationError, match=r"^OWL lambda must be >= 0, got -0\.1\.$"):
        owl(d, 0.5, lam=-0.1)
    with pytest.raises(AllocationError, match=r"^OWL needs at least one block's outlier ratio\.$"):
        owl([], 0.5)
    assert math.isclose(sum(owl([0.0, 10.0], 0.5, lam=0.2)) / 2, 0.5)
