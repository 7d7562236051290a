"""Proximal operators against brute-force minimisation of their definitions on small vectors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from sparsetorch.errors import MethodError
from sparsetorch.regularize.prox import (
    check_lambda,
    group_soft_threshold,
    kgroup_penalty,
    kgroup_prox,
    kgroup_prox_norms,
    ksupport_norm_sq,
    soft_threshold,
    sparse_group_prox,
)


def brute(objective, x0: np.ndarray, starts: int = 4, seed: int = 0) -> np.ndarray:
    """Best of several Powell / Nelder-Mead runs (derivative-free: the objectives are non-smooth)."""
    rng = np.random.default_rng(seed)
    best = None
    for i in range(starts):
        start = x0 if i == 0 else x0 + rng.normal(scale=1.0, size=x0.shape)
        for method, opts in (("Powell", {"xtol": 1e-10, "ftol": 1e-13}), ("Nelder-Mead", {"xatol": 1e-10, "fatol": 1e-13})):
            r = minimize(objective, start, method=method, options={**opts, "maxiter": 40000, "maxfev": 40000})
            if best is None or r.fun < best.fun:
                best = r
    return best.x


def test_soft_threshold_is_the_l1_prox() -> None:
    y = np.array([1.3, -0.2, 0.05, -2.0, 0.7])
    t = 0.4
    ours = soft_threshold(torch.tensor(y), t).numpy()
    bf = brute(lambda x: 0.5 * np.sum((x - y) ** 2) + t * np.abs(x).sum(), y)
    np.testing.assert_allclose(ours, bf, atol=1e-5)
    assert (ours == 0).sum() == 2  # exact zeros, not small numbers


def test_group_soft_threshold_against_brute_force() -> None:
    y = np.array([[1.0, 2.0, -0.5], [0.1, -0.2, 0.1], [0.6, 0.0, -0.6]])
    t = 0.3
    c = np.sqrt(3.0)

    def f(x: np.ndarray) -> float:
        g = x.reshape(3, 3)
        return 0.5 * np.sum((g - y) ** 2) + t * c * np.linalg.norm(g, axis=1).sum()

    ours = group_soft_threshold(torch.tensor(y), t).numpy()
    bf = brute(f, y.reshape(-1)).reshape(3, 3)
    np.testing.assert_allclose(ours, bf, atol=1e-4)
    assert np.all(ours[1] == 0)  # the small group is exactly zero
    assert f(ours.reshape(-1)) <= f(bf.reshape(-1)) + 1e-9


def test_sparse_group_prox_against_brute_force() -> None:
    y = np.array([[1.0, -0.3, 0.8, 0.05], [0.2, 0.25, -0.1, 0.3]])
    t1, t2 = 0.15, 0.2
    c = 2.0  # sqrt(4)

    def f(x: np.ndarray) -> float:
        g = x.reshape(2, 4)
        return 0.5 * np.sum((g - y) ** 2) + t1 * np.abs(g).sum() + t2 * c * np.linalg.norm(g, axis=1).sum()

    ours = sparse_group_prox(torch.tensor(y), t1, t2).numpy()
    bf = brute(f, y.reshape(-1)).reshape(2, 4)
    np.testing.assert_allclose(ours, bf, atol=1e-4)


def topk_sq(y: np.ndarray, k: int) -> float:
    return float(np.sort(y**2)[::-1][:k].sum())


@pytest.mark.parametrize("k", [1, 2, 3])
def test_ksupport_norm_sq_is_the_biconjugate(k: int) -> None:
    """S_k = 1/2 ||.||_(k)^2 is the conjugate of 1/2 (sum of the k largest y_i^2): sup_y <x,y> - that."""
    x = np.array([0.9, -0.4, 0.35, 0.1, -0.05])
    # the sup is attained; maximise the concave function by minimising its negative
    y = brute(lambda y: -(x @ y - 0.5 * topk_sq(y, k)), x.copy(), starts=6)
    conj = x @ y - 0.5 * topk_sq(y, k)
    ours = 0.5 * float(ksupport_norm_sq(torch.tensor(x), k))
    # the numerical sup is a lower bound of the true one
    assert conj <= ours + 1e-9
    assert ours - conj < 1e-5


def test_ksupport_limits() -> None:
    x = torch.tensor([3.0, -1.0, 0.5])
    assert float(ksupport_norm_sq(x, 1)) == pytest.approx(float(x.abs().sum()) ** 2)
    assert float(ksupport_norm_sq(x, 3)) == pytest.approx(float((x * x).sum()))


def test_kgroup_penalty_is_zero_exactly_on_k_group_sparse_vectors() -> None:
    assert float(kgroup_penalty(torch.tensor([2.0, 0.0, 1.0, 0.0]), 2)) == pytest.approx(0.0, abs=1e-12)
    assert float(kgroup_penalty(torch.tensor([2.0, 0.1, 1.0, 0.0]), 2)) > 1e-4
    assert float(kgroup_penalty(torch.tensor([2.0, 0.1, 1.0, 0.3]), 4)) == pytest.approx(0.0, abs=1e-12)


def _kgroup_objective(y: np.ndarray, k: int, t: float, shape: tuple[int, int]):
    def f(x: np.ndarray) -> float:
        g = torch.tensor(x.reshape(shape))
        return 0.5 * float(((g - torch.tensor(y)) ** 2).sum()) + t * float(kgroup_penalty(g.norm(dim=1), k))

    return f


@pytest.mark.parametrize("t", [0.2, 0.6, 1.0, 1.7])
def test_kgroup_prox_against_brute_force(t: float) -> None:
    """prox_{t P_k}(y) minimises 1/2||x - y||^2 + t P_k(x); from t >= 1 on it keeps at most k groups."""
    y = np.array([[1.0, 0.5], [0.3, -0.6], [0.2, 0.1], [-0.8, 0.05]])
    k = 2
    f = _kgroup_objective(y, k, t, y.shape)
    ours = kgroup_prox(torch.tensor(y), k, t).numpy()
    # convex for t < 1 (one start finds the minimum); for t >= 1 also start from y's best k groups
    bf = brute(f, y.reshape(-1), starts=1)
    assert f(ours.reshape(-1)) <= f(bf) + 1e-7
    if t >= 1:
        assert int((np.linalg.norm(ours, axis=1) > 0).sum()) <= k


def test_kgroup_prox_keeps_at_most_k_groups_for_every_k() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randn(12, 3, generator=g)
    for k in range(1, 13):
        out = kgroup_prox(y, k, 1.0)
        assert int((out.norm(dim=1) > 0).sum()) <= k
        kept = torch.topk(y.norm(dim=1), k).indices
        torch.testing.assert_close(out[kept], y[kept])


def test_kgroup_prox_norms_small_t_moves_toward_k_sparse() -> None:
    n = torch.tensor([3.0, 1.0, 0.5, 0.2])
    u = kgroup_prox_norms(n, 2, 0.3)
    assert float(kgroup_penalty(u, 2)) < float(kgroup_penalty(n, 2))
    assert torch.all(u <= n + 1e-12)


def test_bad_input_gets_typed_errors() -> None:
    with pytest.raises(MethodError, match="lambda"):
        check_lambda(-0.1)
    with pytest.raises(MethodError, match=">= 0"):
        check_lambda(float("nan"))
    with pytest.raises(MethodError, match="only 4 groups"):
        kgroup_prox(torch.ones(4, 2), 5, 0.5)
    with pytest.raises(MethodError, match="positive integer"):
        kgroup_prox(torch.ones(4, 2), 0, 0.5)
    with pytest.raises(MethodError, match=">= 0"):
        kgroup_prox_norms(torch.ones(3), 1, -1.0)


def test_small_vectors_enumerated_support() -> None:
    """For t >= 1 the prox equals the best k-group support found by enumeration."""
    g = torch.Generator().manual_seed(3)
    y = torch.randn(5, 2, generator=g).double()
    k = 2
    best = None
    for sup in itertools.combinations(range(5), k):
        x = torch.zeros_like(y)
        x[list(sup)] = y[list(sup)]
        val = 0.5 * float(((x - y) ** 2).sum())
        if best is None or val < best[0]:
            best = (val, x)
    torch.testing.assert_close(kgroup_prox(y, k, 1.0), best[1])
