"""Activation thresholds (TEAL / WINA), checked against their definitions: the histogram quantile
is the empirical quantile (asymmetric inputs too), the installed hook computes W(x * 1[crit >= t]),
calibrated thresholds hit the target sparsity on held-out tokens within 2 points, and a refining
pass sets each threshold to the quantile of its layer's inputs with the thresholds upstream applied."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_llama

from sparsetorch.activation import (
    ActivationThresholds,
    apply_thresholds,
    calibrate_thresholds,
    default_targets,
    quantile_from_histogram,
)
from sparsetorch.activation.thresholds import _BINS, _bin_index
from sparsetorch.errors import CheckpointError, DataError, MethodError, SparsityValueError


@pytest.mark.parametrize("q", [0.1, 0.25, 0.4, 0.5, 0.9])
def test_the_histogram_quantile_is_the_empirical_quantile_of_asymmetric_data(q: float) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=g) * 0.1 + 2.0, torch.rand(10000, generator=g) * -5,
                   torch.zeros(500)])
    v = x.abs()
    t = quantile_from_histogram(torch.bincount(_bin_index(v), minlength=_BINS + 1), q)
    # interpolated inside the log bin (2^(1/64) wide) that holds the empirical q-quantile: within
    # that bin of it, and the fraction below t within half a point of q
    true_q = float(torch.sort(v).values[int(q * v.numel())])
    assert true_q * 2 ** (-1 / 64) < t < true_q * 2 ** (1 / 64)
    assert abs(float((v < t).float().mean()) - q) <= 0.005


def test_exact_zeros_count_as_below_any_positive_threshold() -> None:
    v = torch.cat([torch.zeros(600), torch.ones(400)])
    t = quantile_from_histogram(torch.bincount(_bin_index(v), minlength=_BINS + 1), 0.5)
    assert 0 < t <= 1e-6 and int((v < t).sum()) == 600


def _calib(seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("criterion", ["teal", "wina"])
@pytest.mark.parametrize("s", [0.25, 0.4, 0.5])
def test_thresholds_hit_the_target_on_held_out_tokens_within_2_points(criterion: str, s: float) -> None:
    """Pooled over the layers and for every thresholded tensor on its own. 32 sequences each side:
    o_proj's input (the attention output) is strongly correlated within a sequence, so with 8
    sequences its own fraction is off by up to 6 points on held-out text while the pooled one is
    within 0.3 (sampling, not calibration: the error shrinks with the number of sequences)."""
    m = make_tiny_llama(layers=2, vocab=128)
    calib = torch.randint(0, 128, (32, 64), generator=torch.Generator().manual_seed(1))
    held_out = torch.randint(0, 128, (32, 64), generator=torch.Generator().manual_seed(2))
    th = calibrate_thresholds(m, s, calibration=calib, seq_len=64, criterion=criterion, num_samples=32)
    assert set(th.thresholds) == set(default_targets(m)) and len(th.thresholds) == 14  # 7 projections x 2
    assert th.calibration_tokens == 32 * 64
    h = apply_thresholds(m, th)
    per: dict[str, float] = {}

    def record(n: str):  # noqa: ANN202  (registered after the thresholding hook: sees its output)
        def hook(_mod, args) -> None:  # noqa: ANN001
            per[n] = float((args[0] == 0).float().mean())
        return hook

    rec = [m.get_submodule(n).register_forward_pre_hook(record(n)) for n in th.thresholds]
    with torch.no_grad():
        m(held_out)
    for r in rec:
        r.remove()
    assert abs(h.measured_sparsity - s) <= 0.02
    assert set(per) == set(th.thresholds)
    off = {n: round(v - s, 3) for n, v in per.items() if abs(v - s) > 0.02}
    assert not off, f"tensors off the target by more than 2 points: {off}"
    h.remove()
    assert not h.hooks


@pytest.mark.parametrize("criterion", ["teal", "wina"])
def test_refine_takes_each_quantile_with_the_thresholds_upstream_applied(criterion: str) -> None:
    m = make_tiny_llama(layers=2, vocab=128)
    calib = _calib(1)
    th0 = calibrate_thresholds(m, 0.4, calibration=calib, seq_len=64, criterion=criterion, refine=0)
    th1 = calibrate_thresholds(m, 0.4, calibration=calib, seq_len=64, criterion=criterion, refine=1)
    # by hand: every layer's criterion values on the calibration tokens, th0 applied everywhere
    # (the recording hook runs before the thresholding one, so it sees the layer's raw input)
    seen: dict[str, list[torch.Tensor]] = {}

    def record(n: str):  # noqa: ANN202
        norm = th0.col_norms.get(n)

        def hook(_mod, args) -> None:  # noqa: ANN001
            c = args[0].abs() * (norm if norm is not None else 1)
            seen.setdefault(n, []).append(c.reshape(-1))
        return hook

    hooks = [m.get_submodule(n).register_forward_pre_hook(record(n)) for n in th0.thresholds]
    applied = apply_thresholds(m, th0, count=False)
    with torch.no_grad():
        for i in range(0, calib.shape[0], 4):  # the calibration's own batches of 4
            m(calib[i:i + 4])
    applied.remove()
    for h in hooks:
        h.remove()
    moved = 0
    for n, t1 in th1.thresholds.items():
        v = torch.cat(seen[n]).sort().values
        want = float(v[int(0.4 * v.numel())])
        assert want * 2 ** (-1 / 64) < t1 < want * 2 ** (1 / 64), n
        moved += t1 != th0.thresholds[n]
    assert moved > len(th1.thresholds) // 2  # the layers after the first read other inputs
    for bad in (-1, 1.5, True):
        with pytest.raises(MethodError, match="refine"):
            calibrate_thresholds(m, 0.4, calibration=calib, seq_len=64, refine=bad)


def test_the_hook_computes_the_layer_on_the_thresholded_input() -> None:
    m = make_tiny_llama(layers=1, vocab=128)
    name = "model.layers.0.mlp.down_proj"
    lin = m.get_submodule(name)
    x = torch.randn(3, 5, lin.in_features)
    for criterion in ("teal", "wina"):
        norms = {name: lin.weight.detach().norm(dim=0)} if criterion == "wina" else {}
        th = ActivationThresholds(0.5, criterion, {name: 0.3}, col_norms=norms)
        h = apply_thresholds(m, th)
        crit = x.abs() * (lin.weight.norm(dim=0) if criterion == "wina" else 1)
        with torch.no_grad():
            got = lin(x)
            want = torch.nn.functional.linear(x * (crit >= 0.3), lin.weight, lin.bias)
        torch.testing.assert_close(got, want)
        assert h.measured_sparsity == pytest.approx(float((crit < 0.3).float().mean()))
        h.remove()
    with torch.no_grad():
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))  # removed


def test_sparsity_zero_changes_nothing() -> None:
    m = make_tiny_llama(layers=2, vocab=128)
    ids = _calib(3)
    with torch.no_grad():
        want = m(ids).logits
    th = calibrate_thresholds(m, 0.0, calibration=_calib(1), seq_len=64)
    h = apply_thresholds(m, th)
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, want)
    assert h.measured_sparsity <= 0.001


def test_save_load_round_trip_and_bad_files(tmp_path) -> None:
    m = make_tiny_llama(layers=1, vocab=128)
    th = calibrate_thresholds(m, 0.4, calibration=_calib(1), seq_len=64, criterion="wina")
    th.save(tmp_path / "t.safetensors")
    back = ActivationThresholds.load(tmp_path / "t.safetensors")
    assert back == th
    from sparsetorch.statefile import save_state

    save_state({"something": 1}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not an activation thresholds file"):
        ActivationThresholds.load(tmp_path / "other.safetensors")
    with pytest.raises(DataError, match="does not have"):
        apply_thresholds(m, ActivationThresholds(0.4, "teal", {"model.layers.7.mlp.up_proj": 0.1}))


@pytest.mark.parametrize(("edit", "msg"), [
    ({"allocation": "best"}, "unknown allocation 'best'"),
    ({"criterion": "cats"}, "unknown criterion 'cats'"),
    ({"sparsity": 1.5}, r"sparsity 1.5 is outside \[0, 1\)"),
    ({"thresholds": {"model.layers.0.mlp.up_proj": -1.0}}, "must be finite and >= 0"),
    ({"thresholds": {"model.layers.0.mlp.up_proj": float("nan")}}, "must be finite and >= 0"),
    ({"levels": {"model.layers.0.mlp.up_proj": 1.2}}, r"must lie in \[0, 1\]"),
    ({"col_norms": {}}, "WINA thresholds without the column norms"),
    ({"thresholds": None}, "damaged activation thresholds file"),
])
def test_load_refuses_an_edited_thresholds_file(tmp_path, edit, msg) -> None:
    """Only calibrate_thresholds checked its arguments: a file edited by hand (or by another
    version) with an unknown allocation or a negative threshold loaded and was applied as is."""
    from sparsetorch.statefile import load_state, save_state

    m = make_tiny_llama(layers=1, vocab=128)
    th = calibrate_thresholds(m, 0.4, calibration=_calib(1), seq_len=64, criterion="wina")
    st = load_state(th.save(tmp_path / "t.safetensors"))
    st.update(edit)
    save_state(st, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=msg):
        ActivationThresholds.load(tmp_path / "bad.safetensors")


def test_bad_arguments_raise_typed_errors() -> None:
    m = make_tiny_llama(layers=1, vocab=128)
    for bad in (-0.1, 1.0, 2, True):
        with pytest.raises(SparsityValueError, match=r"\[0, 1\)"):
            calibrate_thresholds(m, bad, calibration=_calib(1))
    with pytest.raises(MethodError, match="unknown activation criterion"):
        calibrate_thresholds(m, 0.4, calibration=_calib(1), criterion="cats")
    with pytest.raises(DataError, match="not an nn.Linear"):
        calibrate_thresholds(m, 0.4, calibration=_calib(1), targets=["model.layers.0.mlp"])
    with pytest.raises(DataError, match="calibration"):
        calibrate_thresholds(m, 0.4)  # neither data nor a tokenizer
