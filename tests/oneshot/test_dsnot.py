"""DSnoT refinement on a constructed layer: |ε| per row goes down, row sparsity stays."""

from __future__ import annotations

import pytest
import torch

import sparsetorch
from sparsetorch.errors import MethodError
from sparsetorch.oneshot import InputStats, dsnot_refine, sparsegpt_prune, wanda_mask
from sparsetorch.oneshot.dsnot import DSnoT, expected_change
from sparsetorch.oneshot.magnitude import magnitude_mask
from sparsetorch.patterns import NM, RowWise, Unstructured


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


# ------------------------------------------------------------------ the solver's options
def _layer_stats(out=32, inp=128, seed=0):
    W, st = _constructed(out, inp, seed)
    g = torch.Generator().manual_seed(seed + 10)
    X = torch.randn(8, 64, inp, generator=g) + torch.linspace(-1, 2, inp)
    full = InputStats(inp, {"sum", "sq", "xtx"})
    full.add(X)
    return W, full


def test_dsnot_solver_refines_attention_only_by_default():
    """The reference's ``--skip_layer mlp``: MLP sublayers keep the initial mask exactly,
    attention sublayers are refined (|ε| per row down); ``include_mlp=True`` refines both."""
    W, st = _layer_stats()
    wanda_keep = wanda_mask(W, st.input_norm(), 0.6, Unstructured())
    mu = st.sum_per_seq()
    default, every = DSnoT(), DSnoT(include_mlp=True)
    for name in ("model.layers.0.mlp.up_proj", "transformer.h.0.mlp.c_fc", "model.decoder.layers.0.fc1"):
        _, k = default.solve(W, st, 0.6, Unstructured(), name=name)
        assert torch.equal(k, wanda_keep), name
        _, k = every.solve(W, st, 0.6, Unstructured(), name=name)
        assert not torch.equal(k, wanda_keep), name
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"):
        _, k = default.solve(W, st, 0.6, Unstructured(), name=name)
        assert not torch.equal(k, wanda_keep), name
        assert torch.equal(k.sum(1), wanda_keep.sum(1))
        e0 = expected_change(W, wanda_keep, mu).abs()
        e1 = expected_change(W, k, mu).abs()
        assert bool((e1 <= e0 + 1e-4).all()) and float(e1.mean()) < 0.8 * float(e0.mean())


def test_dsnot_solver_initial_mask_option():
    """``initial=``: the unrefined (MLP) layers carry exactly the initial solver's result, and the
    refined ones start from its mask (SparseGPT: its mask, the original weights)."""
    W, st = _layer_stats()
    mlp, attn = "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.k_proj"
    _, k = DSnoT(initial="magnitude").solve(W, st, 0.5, Unstructured(), name=mlp)
    assert torch.equal(k, magnitude_mask(W, 0.5, Unstructured()))
    _, k_w = DSnoT(initial="wanda").solve(W, st, 0.5, Unstructured(), name=mlp)
    assert not torch.equal(k, k_w)
    Ws, ks, _ = sparsegpt_prune(W, st.hessian(), 0.5)
    w_sg, k_sg = DSnoT(initial="sparsegpt").solve(W, st, 0.5, Unstructured(), name=mlp)
    assert torch.equal(k_sg, ks) and torch.allclose(w_sg, Ws)
    # refined layer: the refinement of the initial mask, computed here from dsnot_refine
    mu, var, wanda = st.sum_per_seq(), st.var(), W.abs() * st.input_norm()
    for init, keep0 in (("magnitude", magnitude_mask(W, 0.5, Unstructured())), ("sparsegpt", ks)):
        w_out, k = DSnoT(initial=init).solve(W, st, 0.5, Unstructured(), name=attn)
        assert torch.equal(k, dsnot_refine(W, keep0, mu, var, wanda)), init
        assert torch.equal(w_out, W)  # DSnoT changes the mask only
    with pytest.raises(MethodError, match="initial"):
        DSnoT(initial="dsnot")


def test_dsnot_solver_same_sign_option():
    """``same_sign=True`` (default): no row's ε changes sign and none grows; ``same_sign=False``
    (the reference's unstructured default) lets swaps cross zero."""
    W, st = _layer_stats()
    mu, name = st.sum_per_seq(), "model.layers.0.self_attn.v_proj"
    keep0 = wanda_mask(W, st.input_norm(), 0.6, Unstructured())
    e0 = expected_change(W, keep0, mu)
    _, k_ss = DSnoT().solve(W, st, 0.6, Unstructured(), name=name)
    _, k_ns = DSnoT(same_sign=False).solve(W, st, 0.6, Unstructured(), name=name)
    e_ss, e_ns = expected_change(W, k_ss, mu), expected_change(W, k_ns, mu)
    assert bool((torch.sign(e_ss) * torch.sign(e0) >= 0).all())
    assert bool((e_ss.abs() <= e0.abs() + 1e-4).all())
    assert bool((torch.sign(e_ns) * torch.sign(e0) < 0).any())  # some row crossed zero
    assert not torch.equal(k_ss, k_ns)


# ------------------------------------------------------------------ in the pipeline
def _calib(n=4, t=32, seed=1):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _block0_input_means(model, calib):
    """μ_j = Σ_tokens x_j / n_seq of each Linear input in block 0 of the dense model."""
    from torch import nn

    mu, hs = {}, []
    for n, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and n.startswith("model.layers.0."):

            def f(_m, args, _out, n=n):
                mu[n] = args[0].reshape(-1, args[0].shape[-1]).sum(0) / calib.shape[0]

            hs.append(mod.register_forward_hook(f))
    model(calib, use_cache=False)
    for h in hs:
        h.remove()
    return mu


@pytest.mark.usefixtures("one_thread")
def test_pipeline_dsnot_refines_attention_and_leaves_mlp():
    """Block 0 (same inputs as plain Wanda): the pipeline's DSnoT masks equal Wanda's on the MLP
    layers and differ on every attention layer, with a smaller |ε| measured on the dense
    inputs; ``include_mlp=True`` refines the MLP layers too."""
    tiny_models = pytest.importorskip("tiny_models")
    calib = _calib()
    dense = tiny_models.make_tiny_llama(seed=9)
    mu = _block0_input_means(dense, calib)
    w0 = {n: p.detach().clone() for n, p in dense.named_parameters()}
    reps = {}
    for key, kw in (("wanda", {}), ("dsnot", {}), ("dsnot_mlp", {"include_mlp": True})):
        m = tiny_models.make_tiny_llama(seed=9)
        method = "wanda" if key == "wanda" else "dsnot"
        reps[key] = sparsetorch.prune(m, method, 0.6, calibration=calib, progress=False, **kw)
        reps[key].masks.verify(m)
        assert reps[key].sparsity_actual == pytest.approx(0.6, abs=0.01)
    changed = {"attn": 0, "mlp": 0}
    for name, kw in reps["wanda"].masks.items():
        if not name.startswith("model.layers.0."):
            continue
        mod = name[: -len(".weight")]
        kd, km = reps["dsnot"].masks[name], reps["dsnot_mlp"].masks[name]
        eps_w = expected_change(w0[name], kw, mu[mod]).abs()
        e_d = float(expected_change(w0[name], kd, mu[mod]).abs().mean())
        e_m = float(expected_change(w0[name], km, mu[mod]).abs().mean())
        assert torch.equal(kd.sum(1), kw.sum(1)) and torch.equal(km.sum(1), kw.sum(1))
        refined = km if ".mlp." in name else kd
        e_r = e_m if ".mlp." in name else e_d
        if torch.equal(refined, kw):  # only when no row needs work: every |ε_i| <= threshold
            assert float(eps_w.max()) <= 0.1 + 1e-4, name
        else:
            assert e_r < float(eps_w.mean()), name
            changed["mlp" if ".mlp." in name else "attn"] += 1
        if ".mlp." in name:
            assert torch.equal(kd, kw), name  # not refined by default
        else:
            assert torch.equal(km, kd), name
    assert changed["attn"] >= 3 and changed["mlp"] >= 1, changed
