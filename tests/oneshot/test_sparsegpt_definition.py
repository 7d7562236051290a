"""SparseGPT's dampening, retries and solver options against their definitions.

Written for the mutants of ``oneshot/sparsegpt.py`` that no test killed
(benchmarks/mutation_scores.py); the OBS algorithm itself is checked against an independent
textbook loop in test_solvers.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from sparsetorch.errors import MethodError
from sparsetorch.oneshot.sparsegpt import SparseGPT, inverse_hessian_factor, sparsegpt_prune
from sparsetorch.patterns import NM, Channel, RowWise, Unstructured


def _h(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * d, d, generator=g)
    return 2 * X.T @ X


def test_factor_is_the_upper_cholesky_of_the_damped_inverse_with_one_percent_default() -> None:
    H = _h(6).double()
    U, damp = inverse_hessian_factor(H)
    lam = 0.01 * torch.diagonal(H).abs().mean()
    ref = torch.linalg.cholesky(torch.linalg.inv(H + lam * torch.eye(6, dtype=H.dtype)), upper=True)
    assert damp == 0.01 and torch.allclose(U, ref, atol=1e-7, rtol=1e-6)
    U2, damp2 = inverse_hessian_factor(H, 0.5)
    lam2 = 0.5 * torch.diagonal(H).abs().mean()
    ref2 = torch.linalg.cholesky(torch.linalg.inv(H + lam2 * torch.eye(6, dtype=H.dtype)), upper=True)
    assert damp2 == 0.5 and torch.allclose(U2, ref2, atol=1e-7, rtol=1e-6)


def test_not_positive_definite_retries_with_ten_times_the_dampening() -> None:
    H = torch.diag(torch.tensor([-1.0, 1.0])).double()  # mean |diag| = 1: needs damp > 1
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _, damp = inverse_hessian_factor(H, 0.01, name="q_proj")
    msgs = [str(x.message) for x in w]
    assert damp == pytest.approx(10.0)
    assert msgs[0] == ("SparseGPT q_proj: Hessian (2x2) is not positive definite with dampening 0.01; "
                       "retrying with 0.1. More calibration data usually avoids this.")
    assert len(msgs) == 3 and "retrying with 10." in msgs[-1]
    assert all(x.category is RuntimeWarning for x in w)


def test_zero_dampening_retries_from_1e_minus_4() -> None:
    H = torch.zeros(3, 3).double()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _, damp = inverse_hessian_factor(H, 0.0)
    assert damp == 1e-4 and "SparseGPT: Hessian (3x3)" in str(w[0].message) and "retrying with 0.0001" in str(w[0].message)


def test_a_hessian_that_stays_singular_fails_after_six_tries_with_a_typed_error() -> None:
    H = torch.full((2, 2), float("nan")).double()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with pytest.raises(MethodError, match=r"^SparseGPT: Hessian stays singular even with dampening 10000; "
                                              r"check the calibration data \(NaN/inf activations\?\)\.$"):
            inverse_hessian_factor(H)
    assert len(w) == 6
    with pytest.raises(MethodError, match=r"^SparseGPT v_proj: Hessian stays singular"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inverse_hessian_factor(H, max_tries=2, name="v_proj")


class _Stats:
    def __init__(self, H: torch.Tensor) -> None:
        self.H = H

    def hessian(self) -> torch.Tensor:
        return self.H


def test_solver_passes_its_options_and_defaults_to_the_pure_function() -> None:
    torch.manual_seed(0)
    W, H = torch.randn(8, 256), _h(256)
    st = _Stats(H)
    default_w, default_m = SparseGPT().solve(W, st, 0.5, Unstructured())
    ref_w, ref_m, _ = sparsegpt_prune(W, H, 0.5, blocksize=128, percdamp=0.01)
    assert torch.equal(default_w, ref_w) and torch.equal(default_m, ref_m)
    for opts, kw in (({"percdamp": 0.3}, {"percdamp": 0.3}), ({"dampening_frac": 0.3}, {"percdamp": 0.3}),
                     ({"blocksize": 64}, {"blocksize": 64})):
        w, m = SparseGPT(**opts).solve(W, st, 0.5, Unstructured())
        rw, rm, _ = sparsegpt_prune(W, H, 0.5, **kw)
        assert torch.equal(w, rw) and torch.equal(m, rm), opts
        assert not torch.equal(w, default_w), opts  # the option really changes the result
    other, _, _ = sparsegpt_prune(W, H, 0.5, blocksize=129)
    assert not torch.equal(other, default_w)  # 128 is the default, not any block size


def test_solver_patterns_and_last_info() -> None:
    torch.manual_seed(1)
    W, H = torch.randn(4, 16), _h(16)
    sp = SparseGPT()
    w, m = sp.solve(W, _Stats(H), 0.5, RowWise())
    ref_w, ref_m, ref_info = sparsegpt_prune(W, H, 0.5)
    assert torch.equal(w, ref_w) and torch.equal(m, ref_m) and sp.last_info == ref_info
    w, m = sp.solve(W, _Stats(H), 0.5, NM(2, 4))
    assert NM(2, 4).violation(m) is None and int(m.sum()) == 32
    with pytest.raises(MethodError, match=r"^SparseGPT supports unstructured and N:M patterns, not channel\.$"):
        sp.solve(W, _Stats(H), 0.5, Channel())


def test_solver_names_the_layer_in_its_warnings() -> None:
    W = torch.randn(2, 2)
    H = torch.diag(torch.tensor([-1.0, 1.0]))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        SparseGPT().solve(W, _Stats(H), 0.5, Unstructured(), name="model.layers.0.mlp.up_proj")
    assert any("SparseGPT model.layers.0.mlp.up_proj: Hessian" in str(x.message) for x in w)
