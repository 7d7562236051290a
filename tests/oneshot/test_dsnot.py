"""DSnoT refinement on a constructed layer: |ε| per row goes down, row sparsity stays."""

from __future__ import annotations

import torch

from sparsetorch.oneshot import InputStats, dsnot_refine, wanda_mask
from sparsetorch.oneshot.dsnot import expected_change
from sparsetorch.patterns import NM, RowWise


def _constructed(out=32, inp=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    # inputs with non-zero means: pruning shifts every output row by ε_i = Σ_pruned W_ij μ_j
    X = torch.randn(8, 64, inp, generator=g) + torch.linspace(-1, 2, inp)
    st = InputStats(inp, {"sum"})
    st.add(X)
    return W, st


def test_dsnot_lowers_expected_change_and_keeps_row_sparsity():
    W, st = _constructed()
    keep0 = wanda_mask(W, st.input_norm(), 0.6, RowWise())
    wanda = W.abs() * st.input_norm()
    keep = dsnot_refine(
        W, keep0, st.sum_per_seq(), st.var(), wanda, threshold=0.1, max_cycles=50, same_sign=False
    )
    mu = st.sum_per_seq()
    before = expected_change(W, keep0, mu).abs().mean()
    after = expected_change(W, keep, mu).abs().mean()
    assert after < before
    assert torch.equal(keep.sum(1), keep0.sum(1))
    assert not torch.equal(keep, keep0)
    # with the sign check every accepted swap moves ε toward 0 without crossing it
    keep_ss = dsnot_refine(W, keep0, mu, st.var(), wanda)  # same_sign=True is the default
    e0, e1 = expected_change(W, keep0, mu), expected_change(W, keep_ss, mu)
    assert bool((e1.abs() <= e0.abs() + 1e-4).all()) and bool(
        (torch.sign(e1) * torch.sign(e0) >= 0).all()
    )
    assert torch.equal(keep_ss.sum(1), keep0.sum(1))


def test_dsnot_nm_keeps_structure_and_lowers_error():
    W, st = _constructed()
    pat = NM(2, 4)
    keep0 = wanda_mask(W, st.input_norm(), None, pat)
    wanda = W.abs() * st.input_norm()
    keep = dsnot_refine(W, keep0, st.sum_per_seq(), st.var(), wanda, nm=(2, 4))
    assert pat.violation(keep) is None
    assert bool((keep.reshape(32, -1, 4).sum(-1) == 2).all())
    mu = st.sum_per_seq()
    assert expected_change(W, keep, mu).abs().mean() < expected_change(W, keep0, mu).abs().mean()


def test_dsnot_stops_rows_below_threshold():
    W, st = _constructed()
    keep0 = wanda_mask(W, st.input_norm(), 0.5, RowWise())
    keep = dsnot_refine(W, keep0, st.sum_per_seq(), st.var(), W.abs(), threshold=1e9)
    assert torch.equal(keep, keep0)
    keep = dsnot_refine(W, keep0, st.sum_per_seq(), st.var(), W.abs(), max_cycles=0)
    assert torch.equal(keep, keep0)


def test_dsnot_cycle_budget_bounds_swaps():
    W, st = _constructed()
    keep0 = wanda_mask(W, st.input_norm(), 0.5, RowWise())
    keep = dsnot_refine(W, keep0, st.sum_per_seq(), st.var(), W.abs(), threshold=0.0, max_cycles=3)
    # at most 3 swaps per row: at most 3 weights grown back per row
    assert int((keep & ~keep0).sum(1).max()) <= 3


def test_default_dsnot_lowers_true_output_error_on_held_out_inputs():
    """The quantity that matters: ‖(W - Ŵ)X‖² on inputs not used for the statistics."""
    g = torch.Generator().manual_seed(3)
    inp = 128
    W = torch.randn(48, inp, generator=g)
    mean, scale = torch.linspace(-1, 2, inp), torch.rand(inp, generator=g) + 0.2
    X = torch.randn(16, 64, inp, generator=g) * scale + mean
    st = InputStats(inp, {"sum"})
    st.add(X[:8])
    held = X[8:].reshape(-1, inp)

    def err(keep):
        return float(((held @ (W * ~keep).t()) ** 2).mean())

    wanda = W.abs() * st.input_norm()
    for sp in (0.6, 0.7):
        keep0 = wanda_mask(W, st.input_norm(), sp, RowWise())
        keep = dsnot_refine(W, keep0, st.sum_per_seq(), st.var(), wanda)
        assert err(keep) < err(keep0)
