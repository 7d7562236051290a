"""Mask-fixed refit: checked against the closed-form least-squares solution of each row."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_llama

import sparsetorch
from sparsetorch.errors import DataError, MethodError
from sparsetorch.oneshot import InputStats, sparsegpt_prune, wanda_mask
from sparsetorch.oneshot.refit import refit_masked
from sparsetorch.patterns import Unstructured

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(out=24, inp=48, tokens=768, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    mix = torch.randn(inp, inp, generator=g) / inp**0.5 + torch.eye(inp)
    scale = torch.exp(0.5 * torch.randn(inp, generator=g))
    X = (torch.randn(tokens, inp, generator=g) @ mix) * scale
    st = InputStats(inp, {"xtx", "sq"})
    st.add(X.reshape(4, -1, inp))
    return W, X, st


def _closed_form(W, H, keep, percdamp):
    """Row by row, in float64: w'_K = w_K + Hd_KK⁻¹ Hd_KP w_P (the minimizer of δ Hd δᵀ, δ_P = −w_P)."""
    W, H = W.double(), H.double()
    Hd = H + percdamp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    out = torch.zeros_like(W)
    for r in range(W.shape[0]):
        K, P = keep[r], ~keep[r]
        out[r, K] = W[r, K] + torch.linalg.solve(Hd[K][:, K], Hd[K][:, P] @ W[r, P])
    return out


@pytest.mark.parametrize("pattern", ["0.5", "2:4", "0.75"])
def test_refit_reaches_the_least_squares_solution_for_the_mask(pattern):
    W, X, st = _layer()
    H = st.hessian()
    nm = (2, 4) if pattern == "2:4" else None
    s = 0.5 if nm else float(pattern)
    Ws, keep, _ = sparsegpt_prune(W, H, s, nm=nm, blocksize=16)
    Wr, info = refit_masked(W, Ws, keep, H, iters=60)
    assert torch.equal(Wr != 0, keep & (Wr != 0)) and bool((Wr[~keep] == 0).all())
    expect = _closed_form(W, H, keep, 0.01)
    assert torch.allclose(Wr.double(), expect, rtol=1e-3, atol=1e-3 * float(expect.abs().max()))
    # the layer's output error on its calibration inputs falls below SparseGPT's
    err = lambda V: float(torch.linalg.norm(X @ (W - V).t()))  # noqa: E731
    assert err(Wr) < err(Ws)
    assert info["objective_after"] < info["objective_before"]


def test_refit_never_ends_worse_than_its_start_and_keeps_the_mask():
    W, X, st = _layer(seed=3)
    H = st.hessian()
    keep = wanda_mask(W, st.input_norm(), 0.6, Unstructured())
    start = W * keep
    for iters in (0, 1, 3, 40):
        Wr, info = refit_masked(W, start, keep, H, iters=iters)
        assert bool((Wr[~keep] == 0).all())
        assert info["objective_after"] <= info["objective_before"] * (1 + 1e-6)
    # starting from the optimum, nothing moves
    opt = _closed_form(W, H, keep, 0.01).float()
    Wr, _ = refit_masked(W, opt, keep, H, iters=10)
    assert torch.allclose(Wr, opt, atol=1e-4)


def test_refit_option_in_the_pipeline_keeps_masks_and_lowers_output_error():
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    ref = make_tiny_llama(seed=6).eval()
    with torch.no_grad():
        dense_logits = ref(calib, use_cache=False).logits
    outs = {}
    for refit in (0, 20):
        m = make_tiny_llama(seed=6)
        rep = sparsetorch.prune(m, "wanda", None, "2:4", calibration=calib, progress=False, refit=refit)
        rep.masks.verify(m)
        for name in rep.masks:  # exactly 2 kept in every group of 4 along the input dimension
            assert bool((rep.masks[name].reshape(-1, 4).sum(1) == 2).all())
        with torch.no_grad():
            outs[refit] = (m.eval()(calib, use_cache=False).logits - dense_logits).pow(2).mean()
        if refit:
            masks_refit = rep.masks
            ratios = rep.extra["refit_error_ratio"]
            assert set(ratios) == set(rep.masks) and all(0 <= r <= 1 + 1e-6 for r in ratios.values())
        else:
            masks_plain = rep.masks
    # the refit only moves kept weights: block 0 (same inputs either way) keeps Wanda's masks;
    # later blocks see the refit model's hidden states, so their masks may differ
    block0 = [n for n in masks_plain if n.startswith("model.layers.0.")]
    assert block0
    for name in block0:
        assert torch.equal(masks_plain[name], masks_refit[name])
    assert outs[20] < outs[0]


def test_refit_bad_values_and_missing_statistics_raise():
    m = make_tiny_llama(seed=6)
    calib = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    for bad in (-1, 2.5, True, "10"):
        with pytest.raises(MethodError, match="refit"):
            sparsetorch.prune(m, "sparsegpt", 0.5, calibration=calib, progress=False, refit=bad)
    with pytest.raises(DataError, match="calibration"):
        sparsetorch.prune(make_tiny_llama(seed=6), "magnitude", 0.5, refit=5)
