"""OWL allocation and outlier ratio against hand-computed values (ALGORITHMS.md A.4)."""

from __future__ import annotations

import pytest
import torch

from sparsetorch.allocation import outlier_ratio, owl
from sparsetorch.oneshot.allocation import solve_budget


def test_owl_formula_hand_computed():
    # D = [2, 6, 10], lam = 0.08: r = (D - 2)/8 * 0.16 = [0, 0.08, 0.16], mean 0.08
    # d = r - 0.08 + 0.3 (s = 0.7) = [0.22, 0.30, 0.38] -> S = [0.78, 0.70, 0.62]
    sp = owl([2.0, 6.0, 10.0], 0.7, lam=0.08)
    assert sp == pytest.approx([0.78, 0.70, 0.62])
    d = owl({"a": 1.0, "b": 3.0}, 0.5, lam=0.1)
    assert d["a"] == pytest.approx(0.6) and d["b"] == pytest.approx(0.4)


def test_owl_equal_ratios_is_uniform_and_mean_kept():
    assert owl([4.0, 4.0, 4.0], 0.5) == pytest.approx([0.5, 0.5, 0.5])
    sp = owl([1.0, 7.0, 2.0, 9.5], 0.6, lam=0.08)
    assert sum(sp) / 4 == pytest.approx(0.6)


def test_owl_nonpositive_sparsity_becomes_001():
    # s = 0.05, lam = 0.1: densities 0.85 and 1.05 -> sparsities 0.15 and -0.05 -> 0.01
    sp = owl([0.0, 1.0], 0.05, lam=0.1)
    assert sp == pytest.approx([0.15, 0.01])


def test_outlier_ratio_hand_computed():
    # mean = (1*9 + 91)/10 = 10; M=5 -> threshold 50; one of ten above -> 10 %
    sc = torch.tensor([1.0] * 9 + [91.0])
    assert outlier_ratio(sc, 5) == pytest.approx(10.0)
    assert outlier_ratio(sc, 10) == pytest.approx(0.0)


def test_solve_budget_meets_budget_and_prefers_insensitive_blocks():
    grid = [0.4, 0.5, 0.6]
    errors = [[0.1, 0.2, 0.3], [1.0, 2.0, 3.0]]  # block 0 is 10x less sensitive
    sp = solve_budget(errors, grid, [100, 100], 0.5)
    assert sp == pytest.approx([0.6, 0.4])
    sp = solve_budget(errors, grid, [100, 300], 0.5)
    assert (100 * sp[0] + 300 * sp[1]) / 400 == pytest.approx(0.5)
    assert sp[0] == pytest.approx(0.6)
