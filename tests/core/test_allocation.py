"""Allocation against the formulas of ALGORITHMS.md section A."""

from __future__ import annotations

import math

import pytest
import torch

from sparsetorch import allocation as A
from sparsetorch.errors import AllocationError, MethodError, SparsityValueError, TargetError

SHAPES = {
    "conv1": (16, 3, 3, 3),
    "conv2": (32, 16, 3, 3),
    "fc1": (256, 512),
    "fc2": (10, 256),
}


def _numel(sh):
    return math.prod(sh)


@pytest.mark.parametrize("s", [0.5, 0.8, 0.9, 0.95])
def test_erk_follows_formula(s):
    sp = A.erk(SHAPES, s)
    raw = {n: sum(sh) / math.prod(sh) for n, sh in SHAPES.items()}
    scaled = [n for n in SHAPES if sp[n] > 0]
    # density proportional to raw score, one epsilon for all scaled layers
    eps = [(1 - sp[n]) / raw[n] for n in scaled]
    assert max(eps) == pytest.approx(min(eps), rel=1e-9)
    # dense layers are exactly those that would exceed density 1
    for n in SHAPES:
        if sp[n] == 0:
            assert eps[0] * raw[n] >= 1 - 1e-9
    assert A.mean_sparsity(SHAPES, sp) == pytest.approx(s, abs=1e-3)


def test_erk_hand_computed():
    """Two small cases worked by hand from the definition (RigL's get_sparsities_erdos_renyi)."""
    # raw a = (4+8)/32 = 3/8, b = 16/64 = 1/4; uniform 50% keeps 16 + 32 = 48 ones;
    # eps = 48 / (3/8*32 + 1/4*64) = 12/7 -> densities 9/14, 3/7 -> sparsities 5/14, 4/7
    sp = A.erk({"a": (4, 8), "b": (8, 8)}, 0.5)
    assert sp["a"] == pytest.approx(5 / 14) and sp["b"] == pytest.approx(4 / 7)
    # raw a = 4/4 = 1 -> eps = 34/20 = 1.7 makes a's density 1.7 > 1: a is dense, its 4 ones
    # come out of b's budget: b keeps 34 - 4 = 30 of 64 -> sparsity 34/64
    sp = A.erk({"a": (2, 2), "b": (8, 8)}, 0.5)
    assert sp["a"] == 0.0 and sp["b"] == pytest.approx(34 / 64)


def test_er_on_a_pytorch_conv_uses_out_and_in_channels():
    """ER's raw density for a conv is ``(c_out + c_in) / (c_out · c_in)``, the kernel size ignored,
    so a [8, 4, 3, 3] conv scores like an [8, 4] Linear (hand-computed)."""
    er = A.er({"c": (8, 4, 3, 3), "l": (8, 8)}, 0.5)
    # raw c = 12/32 = 3/8 (N = 288), l = 16/64 = 1/4 (N = 64); 50% keeps 144 + 32 = 176 ones;
    # eps = 176 / (3/8 * 288 + 1/4 * 64) = 176/124 -> sparsities 1 - 3/8 eps, 1 - 1/4 eps
    eps = 176 / 124
    assert er["c"] == pytest.approx(1 - 3 / 8 * eps) and er["l"] == pytest.approx(1 - eps / 4)


def test_erk_redistribution_makes_small_layer_dense():
    shapes = {**SHAPES, "tiny": (4, 4)}
    sp = A.erk(shapes, 0.9)
    raw = {n: sum(sh) / math.prod(sh) for n, sh in shapes.items()}
    # "tiny" (raw 0.5) and fc2 (raw 0.104) would exceed density 1 and are made dense
    assert sp["tiny"] == 0.0 and sp["fc2"] == 0.0
    assert all(0 < sp[n] < 1 for n in ("conv1", "conv2", "fc1"))
    assert max(raw[n] for n in shapes if sp[n] > 0) < min(raw[n] for n in shapes if sp[n] == 0)
    assert A.mean_sparsity(shapes, sp) == pytest.approx(0.9, abs=1e-3)


def test_er_ignores_kernel_dims():
    sp = A.er(SHAPES, 0.8)
    raw = {n: (sh[0] + sh[1]) / (sh[0] * sh[1]) for n, sh in SHAPES.items()}
    scaled = [n for n in SHAPES if sp[n] > 0]
    eps = [(1 - sp[n]) / raw[n] for n in scaled]
    assert max(eps) == pytest.approx(min(eps), rel=1e-9)
    assert A.mean_sparsity(SHAPES, sp) == pytest.approx(0.8, abs=1e-3)


def test_erk_power_scale_zero_is_uniform():
    sp = A.erk(SHAPES, 0.7, power_scale=0.0)
    assert all(v == pytest.approx(0.7, abs=1e-4) for v in sp.values())


def test_erk_dense_layers_compensated():
    sp = A.erk(SHAPES, 0.9, dense=["fc2"])
    assert sp["fc2"] == 0.0
    assert A.mean_sparsity(SHAPES, sp) == pytest.approx(0.9, abs=1e-3)


def test_erk_impossible_budget():
    with pytest.raises(AllocationError):
        A.erk({"a": (100, 100), "b": (2, 2)}, 0.99, dense=["a"])


def test_uniform_and_unknown_dense_name():
    assert A.uniform(SHAPES, 0.5) == {n: 0.5 for n in SHAPES}
    with pytest.raises(TargetError, match="fc3"):
        A.uniform(SHAPES, 0.5, dense=["fc3"])


def test_global_single_threshold():
    g = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(50, 40, generator=g) * 3, "b": torch.randn(30, 20, generator=g)}
    sp = A.global_magnitude(params, 0.6)
    total = sum(p.numel() for p in params.values())
    zeros = {n: round(sp[n] * params[n].numel()) for n in params}
    assert sum(zeros.values()) == math.floor(0.6 * total)
    # one threshold: every kept |w| anywhere >= every pruned |w| anywhere
    flat = torch.cat([p.abs().reshape(-1) for p in params.values()])
    thr = flat.sort().values[sum(zeros.values()) - 1]
    assert sp["a"] < sp["b"]  # larger-magnitude layer keeps more
    for n, p in params.items():
        assert int((p.abs() <= thr).sum()) == zeros[n]


def test_allocate_dispatch_errors():
    with pytest.raises(MethodError, match="erk"):
        A.allocate("ekr", {"a": torch.zeros(4, 4)}, 0.5)
    with pytest.raises(SparsityValueError):
        A.allocate("uniform", {"a": torch.zeros(4, 4)}, 1.0)


def test_owl_formula_by_hand():
    # D = [1, 2, 3], lam = 0.1: r = [0, 0.1, 0.2], mean 0.1 -> density = r - 0.1 + 0.5
    sp = A.owl([1.0, 2.0, 3.0], 0.5, lam=0.1)
    assert sp == pytest.approx([0.6, 0.5, 0.4])
    assert sum(sp) / 3 == pytest.approx(0.5)


def test_outlier_ratio_definition():
    scores = torch.tensor([1.0] * 99 + [1000.0])
    # mean = 10.99; M=5 -> threshold 54.95; one of 100 above -> 1 percent
    assert A.outlier_ratio(scores, m=5) == pytest.approx(1.0)
