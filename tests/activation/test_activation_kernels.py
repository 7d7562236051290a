"""The column-gather kernel (reads only the weight rows of non-zero inputs) and its use by
``sparsify_for_inference(activation=...)``: equal to F.linear on the same thresholded input;
chosen only where the measurement says it is faster (fake timer); hooks on the swapped layers."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_llama

from sparsetorch.activation import ActivationThresholds, apply_thresholds, calibrate_thresholds
from sparsetorch.inference import _ext, get_kernel, select_kernel, sparsify_for_inference
from sparsetorch.inference.linear import SparseLinear


def fake_timer(times: dict[str, float]):
    def timer(name, fn):
        fn()  # must run; its duration is ignored
        return times[name]
    return timer


needs_ext = pytest.mark.skipif(_ext.get_extension() is None, reason="compiled kernels not available")


@needs_ext
@pytest.mark.parametrize("name", ["colgather", "colgather_serial"])
@pytest.mark.parametrize("batch", [1, 3])
def test_colgather_equals_f_linear_on_inputs_with_zeros(name: str, batch: int) -> None:
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(700, 300, generator=g), torch.randn(700, generator=g)
    x = torch.randn(batch, 300, generator=g)
    x[torch.rand(batch, 300, generator=g) < 0.6] = 0
    x[0, :] = 0 if batch == 3 else x[0, :]  # an all-zero row gives the bias
    k = get_kernel(name)
    packed = k.pack(w)
    for bias in (b, None):
        torch.testing.assert_close(k.matmul(x, packed, bias, 700), torch.nn.functional.linear(x, w, bias),
                                   atol=1e-4, rtol=1e-5)


def test_selection_measures_on_inputs_with_the_activation_sparsity_and_never_picks_slower(monkeypatch) -> None:
    import sparsetorch.inference.select as sel_mod

    w = torch.randn(64, 100)
    seen: list[float] = []
    real = sel_mod.get_kernel

    class Spy:
        def __init__(self, k):
            self.k = k

        def __getattr__(self, a):
            return getattr(self.k, a)

        def matmul(self, x, packed, bias, out):
            seen.append(float((x == 0).float().mean()))
            return self.k.matmul(x, packed, bias, out)

    monkeypatch.setattr(sel_mod, "get_kernel", lambda n: Spy(real(n)))
    cands = ["colgather"] if _ext.get_extension() is not None else []
    sel = select_kernel(w, None, 1, cands, fake_timer({"dense": 1.0, "colgather": 0.5}), input_sparsity=0.4)
    assert seen and all(s == pytest.approx(0.4) for s in seen)  # 40 of 100 inputs are exact zeros
    if not cands:
        pytest.skip("compiled extension unavailable: the choice between kernels is not exercised")
    assert sel.kernel == "colgather"
    slow = select_kernel(w, None, 1, cands, fake_timer({"dense": 1.0, "colgather": 1.2}), input_sparsity=0.4)
    assert slow.kernel == "dense"


@needs_ext
def test_sparsify_with_activation_thresholds_swaps_dense_layers_and_keeps_the_thresholded_outputs() -> None:
    m = make_tiny_llama(layers=2, vocab=128)
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    th = calibrate_thresholds(m, 0.5, calibration=calib, seq_len=32)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    ref_handle = apply_thresholds(m, th)
    with torch.no_grad():
        want = m(ids).logits  # the dense model on thresholded inputs (the definition)
    ref_handle.remove()
    weights = {n: mod.weight.detach().clone() for n, mod in m.named_modules() if n in th.thresholds}
    times = {"dense": 1.0, "colgather": 0.4, "colgather_serial": 0.5}
    rep = sparsify_for_inference(m, 1, timer=fake_timer(times), activation=th)
    swapped = [n for n, mod in m.named_modules() if isinstance(mod, SparseLinear)]
    assert sorted(swapped) == sorted(th.thresholds)  # dense weights, swapped for their activations
    assert rep.replaced and all(c.kernel in ("colgather", "colgather_serial") for c in rep.replaced)
    with torch.no_grad():
        got = m(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not rep.activation.hooks  # every thresholded layer applies its threshold in the kernel
    for name, mod in m.named_modules():
        if isinstance(mod, SparseLinear):
            assert float(mod._packed()["threshold"]) == pytest.approx(th.thresholds[name], rel=1e-6)
            assert th.thresholds[name] > 0
            # the weight alone comes back: the fused threshold does not mask the identity
            torch.testing.assert_close(mod.to_dense_weight(), weights[name])


@needs_ext
@pytest.mark.parametrize("criterion", ["teal", "wina"])
def test_a_fused_layer_put_back_by_the_model_check_keeps_its_threshold(criterion: str) -> None:
    m = make_tiny_llama(layers=2, vocab=128)
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    th = calibrate_thresholds(m, 0.5, calibration=calib, seq_len=32, criterion=criterion)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    ref = apply_thresholds(m, th)
    with torch.no_grad():
        want = m(ids).logits
    ref.remove()
    layer_times = fake_timer({"dense": 1.0, "colgather": 0.4, "colgather_serial": 0.5})
    model_times = fake_timer({f"model:{k}": v for k, v in
                              {"dense": 1.0, "all": 2.0, ">=1.5x": 2.0, ">=2x": 2.0, ">=3x": 2.0}.items()})
    rep = sparsify_for_inference(m, 1, timer=layer_times, model_timer=model_times, activation=th)
    assert rep.model_check.chosen == "dense" and len(rep.reverted) == len(th.thresholds)
    assert not any(isinstance(mod, SparseLinear) for mod in m.modules())
    assert len(rep.activation.hooks) == len(th.thresholds)  # every reverted layer has its hook back
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, want, atol=1e-4, rtol=1e-4)


@needs_ext
@pytest.mark.parametrize("criterion", ["teal", "wina"])
def test_colgather_applies_a_threshold_and_scale_itself(criterion: str) -> None:
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(50, 40, generator=g), torch.randn(50, generator=g)
    x = torch.randn(2, 40, generator=g)
    scale = w.norm(dim=0) if criterion == "wina" else None
    k = get_kernel("colgather")
    packed = dict(k.pack(w), threshold=torch.tensor(0.7))
    if scale is not None:
        packed["scale"] = scale.contiguous()
    crit = x.abs() * (scale if scale is not None else 1)
    want = torch.nn.functional.linear(x.masked_fill(crit < 0.7, 0), w, b)
    torch.testing.assert_close(k.matmul(x, packed, b, 50), want, atol=1e-4, rtol=1e-5)


def test_wina_thresholds_apply_to_a_swapped_layer_through_their_saved_column_norms() -> None:
    lin = torch.nn.Linear(8, 4)
    model = torch.nn.Sequential(lin)
    th = ActivationThresholds(0.5, "wina", {"0": 0.2}, col_norms={"0": lin.weight.detach().norm(dim=0)})
    x = torch.randn(2, 8)
    h = apply_thresholds(model, th)
    with torch.no_grad():
        got = model(x)
    keep = x.abs() * lin.weight.norm(dim=0) >= 0.2
    torch.testing.assert_close(got, torch.nn.functional.linear(x * keep, lin.weight, lin.bias))
    h.remove()
    from sparsetorch.errors import DataError

    with pytest.raises(DataError, match="no column norms"):
        apply_thresholds(model, ActivationThresholds(0.5, "wina", {"0": 0.2}))


def test_a_busy_machine_offers_only_the_single_thread_activation_kernel(monkeypatch) -> None:
    from sparsetorch.inference import kernels as kmod
    from sparsetorch.inference.sparsify import layer_candidates

    th = ActivationThresholds(0.4, "teal", {"x": 0.1})
    lin = torch.nn.Linear(4, 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(kmod, "machine_busy", lambda: True)
    names, s, reason = layer_candidates("x", lin, "sparsity 0% < min_sparsity 30%", None, th)
    assert names == ["dense", "colgather_serial"] and s == 0.4 and reason is None
    monkeypatch.setattr(kmod, "machine_busy", lambda: False)
    names, _, _ = layer_candidates("x", lin, "sparsity 0% < min_sparsity 30%", None, th)
    assert names == ["dense", "colgather", "colgather_serial"]
    assert layer_candidates("y", lin, None, ["dense"], th) == (["dense"], 0.0, None)  # not thresholded
    assert layer_candidates("x", lin, "weight shared with another module", None, th)[2] is not None


def test_cli_activation_flags_are_checked_before_the_model_loads(hf_dir) -> None:
    from test_cli_errors import run_script

    proc = run_script("bench", "inference", "--model", str(hf_dir), "--activation-sparsity", "1.2")
    assert proc.returncode == 2 and "SparsityValueError" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_script("plan", str(hf_dir), "--activation-sparsity", "0.4", "--activation-criterion", "cats")
    assert proc.returncode == 2 and "unknown --activation-criterion 'cats'" in proc.stderr


def test_bench_inference_reports_the_activation_sparsity(hf_dir, tmp_path) -> None:
    import json

    from test_cli_main import run

    out = tmp_path / "b.json"
    assert run(["bench", "inference", "--model", str(hf_dir), "--activation-sparsity", "0.4", "--tokens", "2",
                "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["activation_sparsity"] == 0.4 and d["activation_criterion"] == "teal"
    assert abs(d["activation_sparsity_measured"] - 0.4) < 0.1
    assert d["dense_tokens_per_s"] > 0 and d["sparse_tokens_per_s"] > 0


@needs_ext
def test_plan_measures_the_thresholded_layers_with_the_activation_kernels(monkeypatch) -> None:
    import sparsetorch.inference.kernels as kmod
    from sparsetorch.inference import plan

    monkeypatch.setattr(kmod, "machine_busy", lambda: False)  # a quiet machine: both variants offered

    m = make_tiny_llama(layers=1, vocab=128)
    th = ActivationThresholds(0.4, "teal", {"model.layers.0.mlp.down_proj": 0.1})
    times = {"dense": 1.0, "colgather": 0.4, "colgather_serial": 0.5, "model": 1.0}
    rep = plan(m, 1, timer=fake_timer(times), activation=th)
    by = {c.name: c for c in rep.layers}
    assert by["model.layers.0.mlp.down_proj"].kernel == "colgather"
    assert "colgather" not in by["model.layers.0.mlp.up_proj"].times  # not thresholded: dense only
    assert all(n in ("model.layers.0.mlp.down_proj",) or c.kernel == "dense" for n, c in by.items())


def test_plan_saves_the_thresholds_it_calibrated(hf_dir, tmp_path) -> None:
    """`plan --activation-sparsity S --activation-allocation greedy --save-thresholds F`: F holds the
    thresholds calibrate_thresholds gives on the same model and text (by definition), and a second
    run refuses to overwrite it."""
    import transformers
    from test_cli_errors import run_script
    from test_cli_main import run

    from sparsetorch.inference.cli import _thresholds

    f = tmp_path / "th.safetensors"
    assert run(["plan", str(hf_dir), "--activation-sparsity", "0.4", "--activation-allocation", "greedy",
                "--save-thresholds", str(f)]) == 0
    got = ActivationThresholds.load(f)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ref = _thresholds(model, tok, 0.4, "teal", "greedy")
    assert got.allocation == "greedy" and got.sparsity == 0.4 and got.thresholds == ref.thresholds
    assert len(set(got.levels.values())) > 1  # greedy: the levels differ between projections
    before = f.read_bytes()
    proc = run_script("plan", str(hf_dir), "--activation-sparsity", "0.4", "--save-thresholds", str(f))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--overwrite" in proc.stderr
    assert f.read_bytes() == before
    proc = run_script("plan", str(hf_dir), "--save-thresholds", str(tmp_path / "x.safetensors"))
    assert proc.returncode == 2 and "needs --activation-sparsity" in proc.stderr
    proc = run_script("generate", str(hf_dir), "-p", "hi", "--activation-sparsity", "0.4",
                      "--activation-allocation", "best")
    assert proc.returncode == 2 and "unknown --activation-allocation 'best'" in proc.stderr


def test_sparsify_activations_takes_calib_and_refuses_unknown_keywords() -> None:
    from sparsetorch.activation import calibrate_thresholds, sparsify_activations
    from sparsetorch.errors import DataError

    m = make_tiny_llama(layers=1, vocab=128)
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    ref = calibrate_thresholds(m, 0.4, calibration=calib, num_samples=4, seq_len=16, batch_size=2)
    handle, th = sparsify_activations(m, sparsity=0.4, calib=calib, num_samples=4, seq_len=16, batch_size=2)
    try:
        assert th.thresholds == ref.thresholds
        m(calib[:2])
        assert abs(handle.measured_sparsity - 0.4) < 0.1  # the hooks are installed and zero inputs
    finally:
        handle.remove()
    with pytest.raises(DataError, match="unknown keyword"):
        sparsify_activations(m, 0.4, calibraton=calib)
    with pytest.raises(DataError, match="not both"):
        sparsify_activations(m, 0.4, calib=calib, calibration=calib)
    with pytest.raises(DataError, match="no module 'model.layers.7.mlp.up_proj'"):
        calibrate_thresholds(m, 0.4, calibration=calib, targets=["model.layers.7.mlp.up_proj"])
