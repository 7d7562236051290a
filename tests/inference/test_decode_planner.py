"""The planner's decode estimate: bytes per token from the weights (equal to the engine's own
count), the prediction formula, its monotonicity, the plan report's decode section, and the
benchmark's offline check on made-up results. No timing is asserted anywhere: whether the
prediction lands within 20% of measured speed is checked by ``benchmarks/decode_vs_llamacpp.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from bench_module import load_benchmark  # noqa: E402
from test_decode import prune_half, tiny_llama  # noqa: E402

from sparsetorch.errors import DataError, MethodError, ModelError  # noqa: E402
from sparsetorch.inference._decode_ext import get_decode_extension  # noqa: E402
from sparsetorch.inference.plan import (  # noqa: E402
    DecodeEstimate,
    decode_bytes_per_token,
    decode_estimates,
    plan,
    predict_decode_tokens_per_s,
)

needs_ext = pytest.mark.skipif(get_decode_extension() is None, reason="compiled decode extension unavailable")


def prune_to(model: torch.nn.Module, sparsity: float) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "layers" in name:
                k = int(p.numel() * sparsity)
                if k:
                    th = p.abs().flatten().kthvalue(k).values
                    p[p.abs() <= th] = 0.0


@needs_ext
@pytest.mark.parametrize(("tied", "bias", "sparsity"), [(True, False, 0.0), (False, True, 0.5), (True, False, 0.8)])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "int8"])
def test_bytes_per_token_equal_the_engines_own_count(tied: bool, bias: bool, sparsity: float, dtype: str) -> None:
    from sparsetorch.inference import DecodeEngine

    model = tiny_llama(seed=3, tied=tied, bias=bias)
    prune_to(model, sparsity)
    for head in (None, "fp32", "int8"):
        eng = DecodeEngine.from_model(model, dtype, head_dtype=head)
        assert decode_bytes_per_token(model, dtype, head_dtype=head) == eng.weight_bytes_per_token
    for layout in ("dense", "bitmask", "csr"):
        eng = DecodeEngine.from_model(model, dtype, layout=layout)
        assert decode_bytes_per_token(model, dtype, layout=layout) == eng.weight_bytes_per_token


def test_bytes_per_token_fall_with_narrower_values_and_more_sparsity() -> None:
    model = tiny_llama(seed=4, hidden=64, inter=128)
    by_dtype = {dt: decode_bytes_per_token(model, dt) for dt in ("fp32", "fp16", "bf16", "int8")}
    assert by_dtype["fp32"] > by_dtype["fp16"] == by_dtype["bf16"] > by_dtype["int8"]
    previous = by_dtype
    for sparsity in (0.5, 0.7, 0.9):
        prune_to(model, sparsity)
        now = {dt: decode_bytes_per_token(model, dt) for dt in by_dtype}
        assert all(now[dt] < previous[dt] for dt in now), (sparsity, now, previous)
        previous = now
    # an fp32 head on an int8 decoder reads more than an int8 head
    assert decode_bytes_per_token(model, "int8", head_dtype="fp32") > decode_bytes_per_token(model, "int8")


def test_prediction_formula() -> None:
    # 100 MB at 10 GB/s = 10 ms, plus 2.5 ms overhead = 12.5 ms per token = 80 tokens/s
    assert predict_decode_tokens_per_s(100e6, 10.0, 0.0025) == pytest.approx(80.0)
    assert predict_decode_tokens_per_s(100e6, 10.0) == pytest.approx(100.0)  # the bandwidth ceiling
    fewer = [predict_decode_tokens_per_s(b, 10.0, 0.002) for b in (538e6, 269e6, 135e6)]
    assert fewer == sorted(fewer) and fewer[-1] < 1 / 0.002  # the overhead bounds the speed
    for bad in ((0, 10.0, 0.0), (1e6, 0.0, 0.0), (1e6, 10.0, -1.0)):
        with pytest.raises(DataError):
            predict_decode_tokens_per_s(*bad)
    est = DecodeEstimate("fp16", "fp16", 200_000_000, 20.0, 0.001, threads=2)
    assert est.tokens_per_s == pytest.approx(1 / (0.01 + 0.001)) and est.ceiling_tokens_per_s == pytest.approx(100.0)
    d = est.to_dict()
    assert d["predicted_tokens_per_s"] == est.tokens_per_s and d["measured_tokens_per_s"] is None
    json.dumps(d)


def test_bad_inputs_are_typed_errors() -> None:
    model = tiny_llama(seed=1)
    with pytest.raises(MethodError, match="unknown weight dtype 'fp8'"):
        decode_bytes_per_token(model, "fp8")
    with pytest.raises(ModelError, match="unknown layout"):
        decode_bytes_per_token(model, "fp32", layout="blocks")
    with pytest.raises(ModelError, match="cannot run this model"):
        decode_bytes_per_token(torch.nn.Linear(4, 4), "fp32")


def test_estimates_with_given_bandwidth_and_overhead_time_nothing(monkeypatch) -> None:
    import importlib

    bench = importlib.import_module("sparsetorch.inference.bench")
    plan_mod = importlib.import_module("sparsetorch.inference.plan")  # the package's `plan` is the function

    def no_timing(*a: object, **k: object) -> None:
        raise AssertionError("nothing may be timed when bandwidth and overhead are given")

    monkeypatch.setattr(bench, "streaming_bandwidth_gbs", no_timing)
    monkeypatch.setattr(plan_mod, "measure_decode_overhead", no_timing)
    model = tiny_llama(seed=2)
    prune_half(model)
    ests = decode_estimates(model, ("fp32", "int8"), bandwidth_gb_per_s=10.0, overhead_s=0.001)
    assert [e.dtype for e in ests] == ["fp32", "int8"]
    assert ests[0].tokens_per_s < ests[1].tokens_per_s
    assert ests[0].tokens_per_s == pytest.approx(predict_decode_tokens_per_s(ests[0].bytes_per_token, 10.0, 0.001))


def test_plan_report_carries_the_decode_estimate(monkeypatch) -> None:
    model = tiny_llama(seed=2)
    rep = plan(model, timer=lambda name, fn: 1.0, decode_bandwidth_gb_per_s=10.0, decode_overhead_s=0.001)
    assert [d.dtype for d in rep.decode] == ["fp32", "fp16", "bf16", "int8"] and rep.decode_note is None
    d = rep.to_dict()["decode"]
    assert d[0]["bytes_per_token"] == decode_bytes_per_token(model, "fp32")
    text = str(rep)
    assert "decode engine" in text and "10.0 GB/s" in text and "1.00 ms" in text
    # batch > 1 is not decoding; a model the engine cannot run says why
    assert plan(model, batch_size=4, timer=lambda name, fn: 1.0).decode == []
    small = tiny_llama(seed=2)
    small.config.hidden_act = "gelu"
    rep = plan(small, timer=lambda name, fn: 1.0, decode_bandwidth_gb_per_s=10.0, decode_overhead_s=0.0)
    assert rep.decode == [] and "hidden_act" in (rep.decode_note or "")


def test_benchmark_planner_check_on_made_up_results(tmp_path: Path, monkeypatch) -> None:
    """The overhead is calibrated on the dense fp32 row (excluded from the count), every other row
    of ours is predicted from its bytes and the run's bandwidth, llama.cpp rows are left alone."""
    bench = load_benchmark("decode_vs_llamacpp")

    def row(nbytes: int, tps: float, runtime: str = "sparsetorch") -> dict:
        return {"runtime": runtime, "config": "dense", "dtype": "fp32", "bytes_per_token": nbytes,
                "decode_tokens_per_s": {"median": tps}}

    res = {"bandwidth_ceiling_gb_per_s": {"median": 10.0},
           # 100 MB at 10 GB/s = 10 ms; measured 12.5 ms -> overhead 2.5 ms
           "rows": {"ours dense fp32": row(100_000_000, 80.0), "ours dense fp16": row(50_000_000, 133.0),
                    "ours x int8": row(25_000_000, 100.0), "llama.cpp F32": row(100_000_000, 70.0, "llama.cpp")}}
    check = bench.planner_predictions(res)
    assert check["overhead_s"] == pytest.approx(0.0025) and check["calibration_row"] == "ours dense fp32"
    assert set(check["rows"]) == {"ours dense fp32", "ours dense fp16", "ours x int8"}
    fp16 = check["rows"]["ours dense fp16"]
    assert fp16["predicted_tokens_per_s"] == pytest.approx(1 / 0.0075) and fp16["within_20pct"]
    assert not check["rows"]["ours x int8"]["within_20pct"]  # predicted 200 vs 100 measured
    assert check["checked"] == 2 and check["within_20pct"] == 1 and check["fraction_within_20pct"] == 0.5
    # the offline mode writes its own JSON and leaves the results file as it was
    src = tmp_path / "decode_vs_llamacpp_made_up.json"
    src.write_text(json.dumps(res))
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setattr(bench, "CACHE", tmp_path / "no-models")  # no cached model: bandwidth-only predictions
    monkeypatch.setattr(bench, "planner_bytes_check",
                        lambda rows, planner_bytes: {"equal": [], "different": {}, "skipped": list(rows)})
    out = bench.planner_check(src, ["--planner-check", str(src)])
    assert out == tmp_path / "decode_planner_check_made_up.json"
    written = json.loads(out.read_text())
    assert written["fraction_within_20pct"] == 0.5 and written["source"]["file"].endswith(src.name)
    assert written["model"] == "bandwidth" and written["kernel_costs"]["costs_by_working_set_bytes"] == {}
    assert json.loads(src.read_text()) == res
    # with the roofline's seconds for the weights: the int8 row's compute-bound 7.5 ms is predicted
    roof = bench.planner_predictions(res, {"ours dense fp32": 0.010, "ours dense fp16": 0.005, "ours x int8": 0.0075})
    assert roof["model"] == "streamed kernels" and roof["overhead_s"] == pytest.approx(0.0025)
    assert roof["rows"]["ours x int8"]["predicted_tokens_per_s"] == pytest.approx(100.0)
    assert roof["within_20pct"] == 2
    # an overhead measured by the engine's profile: no calibration row, every row checked
    measured = bench.planner_predictions(res, {"ours dense fp32": 0.010, "ours dense fp16": 0.005,
                                               "ours x int8": 0.0075}, overhead_s=0.0025)
    assert measured["calibration_row"] is None and measured["checked"] == 3 and measured["within_20pct"] == 3
    assert measured["rows"]["ours dense fp32"]["predicted_tokens_per_s"] == pytest.approx(80.0)
    assert "measured" in measured["overhead"] and "calibrated" in roof["overhead"]


def test_matrix_costs_count_positions_stored_values_and_bytes() -> None:
    from sparsetorch.inference.plan import decode_matrix_costs

    model = tiny_llama(seed=5, hidden=64, inter=128)
    prune_to(model, 0.7)
    costs = decode_matrix_costs(model, "fp16")
    layer = model.model.layers[0]
    down = next(c for c in costs if c.name == "layers.0.down")
    w = layer.mlp.down_proj.weight
    assert down.positions == w.numel() and down.layout == "bitmask" and down.dtype == "fp16"
    assert down.stored == int((w != 0).sum())  # the definition: the non-zeros a bitmask stores
    head = costs[0]
    assert head.name == "lm_head" and head.layout == "dense" and head.stored == head.positions == \
        model.model.embed_tokens.weight.numel()
    assert len(costs) == 1 + 4 * model.config.num_hidden_layers


def test_kernel_costs_separate_position_and_value_costs_and_the_roofline_takes_the_longer() -> None:
    """A fake clock with known costs: the two densities give back the cost per position and per
    stored value (the Python call's cost taken off); the roofline per matrix is max(streaming,
    compute)."""
    from sparsetorch.inference.plan import (
        KernelCost,
        MatrixCost,
        decode_weight_seconds,
        measure_kernel_costs,
    )

    a, b, n = 2e-12, 5e-11, 256 * 512

    call = 4e-6  # the Python call of one product: measured on a 16 x 16 product and taken off

    def timer(fns: dict) -> dict[str, float]:
        out = {"call": 64 * call}
        for key in fns.keys() - {"call"}:
            lay, _, d = key.split("/")
            per_call = (a * n + b * float(d) * n) if lay != "dense" else 3e-12 * n
            out[key] = 8 * (per_call + call)  # 8 products per timed call
        return out

    kc = measure_kernel_costs([("bitmask", "int8"), ("dense", "fp32")], rows=256, cols=512, timer=timer)
    assert kc[("bitmask", "int8")].per_position_s == pytest.approx(a)
    assert kc[("bitmask", "int8")].per_value_s == pytest.approx(b)
    assert kc[("dense", "fp32")] == KernelCost(pytest.approx(3e-12), 0.0)
    m = MatrixCost("x", "bitmask", "int8", nbytes=1_000_000, positions=10**6, stored=5 * 10**5)
    # streaming 1 MB at 10 GB/s = 100 us; compute 2 us + 25 us = 27 us -> streaming wins
    assert decode_weight_seconds([m], 10.0, kc) == pytest.approx(1e-4)
    # at 100 GB/s streaming is 10 us: compute (27 us) wins; unknown kinds and no costs stream
    assert decode_weight_seconds([m], 100.0, kc) == pytest.approx(2.7e-5)
    assert decode_weight_seconds([m], 100.0) == pytest.approx(1e-5)
    assert measure_kernel_costs([]) == {}
    # 40% live inputs: the transposed kernel reads 40% (its compute 4 us -> 4 us vs 10 us x 0.4)
    half = MatrixCost("x", "bitmask", "int8", nbytes=1_000_000, positions=10**6, stored=5 * 10**5, live=0.4)
    kc[("bitmask-t", "int8")] = KernelCost(1e-11, 0.0)  # 10 us for all rows -> 4 us at 40%
    assert decode_weight_seconds([half], 100.0, kc) == pytest.approx(max(0.4 * 1e-5, 0.4 * 1e-5))
    kc[("bitmask-t", "int8")] = KernelCost(1e-10, 0.0)  # 100 us -> 40 us: slower than plain (27 us)
    assert decode_weight_seconds([half], 100.0, kc) == pytest.approx(2.7e-5)


def test_streaming_kernel_costs_cycle_through_the_working_set_and_are_taken_as_measured(monkeypatch) -> None:
    """With a working set, each timed call reads distinct copies of the packed matrix filling at
    least that many bytes (each product once), the cost per product is the call's time over the
    copies, and the per-matrix time is that cost even where streaming at the given bandwidth
    would say otherwise (memory is already in it)."""
    import sparsetorch.inference.lowbit as lowbit
    from sparsetorch.errors import LimitError
    from sparsetorch.inference.plan import (
        MAX_WORKING_SET_BYTES,
        MatrixCost,
        decode_weight_seconds,
        measure_kernel_costs,
    )

    seen: list[int] = []
    monkeypatch.setattr(lowbit, "lowbit_matmul", lambda x, q, check=True: seen.append(q.values.data_ptr()))
    a, b, n, ws = 4e-12, 6e-11, 64 * 128, 3_000_000
    calls: dict[str, int] = {}

    def timer(fns: dict) -> dict[str, float]:
        out = {"call": 64 * 2e-6}
        for key, fn in fns.items():
            if key == "call":
                continue
            seen.clear()
            fn()
            calls[key] = len(seen)
            assert len(set(seen)) == len(seen)  # distinct copies, each read once per pass
            lay, _, d = key.split("/")
            out[key] = len(seen) * (2e-6 + ((a * n + b * float(d) * n) if lay != "dense" else 3e-12 * n))
        return out

    kc = measure_kernel_costs([("bitmask", "fp16"), ("dense", "int8")], rows=64, cols=128, working_set_bytes=ws,
                              timer=timer)
    bm, de = kc[("bitmask", "fp16")], kc[("dense", "int8")]
    assert bm.per_position_s == pytest.approx(a) and bm.per_value_s == pytest.approx(b) and bm.streaming
    assert de.per_position_s == pytest.approx(3e-12) and de.working_set_bytes == ws
    assert calls["dense/int8/1.0"] == -(-ws // (64 * 128 + 64 * 4))  # int8 dense copies: values + fp32 scales
    assert calls["bitmask/fp16/0.3"] > calls["bitmask/fp16/0.7"] > 1
    m = MatrixCost("x", "bitmask", "fp16", nbytes=1_000_000, positions=10**6, stored=5 * 10**5)
    # measured streaming: 4 us + 30 us, though 1 MB at 10 GB/s would take 100 us
    assert decode_weight_seconds([m], 10.0, kc) == pytest.approx(3.4e-5)
    # a working set larger than a quarter of the free memory is capped (and the cap recorded)
    import psutil

    class Tight:
        available = 4 * 1_000_000

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tight())
    capped = measure_kernel_costs([("dense", "int8")], rows=64, cols=128, working_set_bytes=ws, timer=timer)
    assert capped[("dense", "int8")].working_set_bytes == 1_000_000
    assert calls["dense/int8/1.0"] == -(-1_000_000 // (64 * 128 + 64 * 4))
    with pytest.raises(LimitError, match="working_set_bytes"):
        measure_kernel_costs([("dense", "fp32")], working_set_bytes=MAX_WORKING_SET_BYTES + 1)
    with pytest.raises(LimitError, match="working_set_bytes"):
        measure_kernel_costs([("dense", "fp32")], working_set_bytes=-1)


@needs_ext
def test_measured_kernel_costs_are_positive_for_each_kind() -> None:
    from sparsetorch.inference.plan import measure_kernel_costs

    kinds = [("bitmask", "fp16"), ("dense", "int8"), ("bitmask-t", "fp32"), ("dense-t", "fp16")]
    kc = measure_kernel_costs(kinds, rows=64, cols=128, timer=lambda fns: {k: (fn(), 1e-5)[1] for k, fn in fns.items()})
    assert set(kc) == set(kinds)
    assert kc[("dense", "int8")].per_position_s > 0


def test_activation_thresholds_in_the_decode_estimate() -> None:
    """With TEAL thresholds, a thresholded matrix may read only its live inputs' weights: by
    bytes over bandwidth (no kernel costs) its time is ``live`` times its plain time, and
    ``live`` is one minus the calibrated level of its input."""
    from test_decode_activation import _thresholds

    from sparsetorch.inference.plan import decode_matrix_costs, decode_weight_time

    model = tiny_llama(seed=6)
    th = _thresholds(model, 0.5)
    costs = decode_matrix_costs(model, "fp32", activation=th)
    thr = [c for c in costs if c.live < 1.0]
    assert len(thr) == 4 * model.config.num_hidden_layers and costs[0].live == 1.0  # the head reads everything
    q = next(n for n in th.thresholds if n.endswith("layers.0.self_attn.q_proj"))
    assert costs[1].name == "layers.0.qkv" and costs[1].live == pytest.approx(1.0 - th.levels.get(q, th.sparsity))
    bw = 10.0
    n_plain, t_plain = decode_weight_time(model, "fp32", bw)
    n_act, t_act = decode_weight_time(model, "fp32", bw, activation=th)
    saved = sum(c.nbytes * (1.0 - c.live) for c in thr) / (bw * 1e9)
    assert n_act == n_plain and t_act == pytest.approx(t_plain - saved)
    ests = decode_estimates(model, ("fp32",), bandwidth_gb_per_s=bw, overhead_s=0.001, activation=th)
    assert ests[0].activation_sparsity == 0.5 and ests[0].tokens_per_s == pytest.approx(1.0 / (t_act + 0.001))
    rep = plan(model, timer=lambda name, fn: 1.0, activation=th, decode_bandwidth_gb_per_s=bw, decode_overhead_s=0.001)
    assert rep.decode[0].tokens_per_s == pytest.approx(ests[0].tokens_per_s) and "TEAL activation sparsity" in str(rep)


def test_decode_overhead_is_the_profiled_step_time_outside_the_matrix_products() -> None:
    """The overhead is the engine profile's median time per token minus its matrix products' time
    per forward call (a one-token prompt: every call is one row), the median over runs."""
    from sparsetorch.inference.decode import DecodeStats
    from sparsetorch.inference.plan import measure_decode_overhead

    class FakeEngine:
        config = {"vocab": 100}
        runs = 0

        def generate(self, ids, n, *, profile=False, on_token=None):
            if profile:
                assert ids.shape == (1, 1)  # one-token prompt
                FakeEngine.runs += 1
                token = [0.005, 0.005, 0.009] if FakeEngine.runs == 1 else [0.006] * 3
                self.last_stats = DecodeStats(calls=n, seconds=0.0, linear_seconds=0.004 * n, attention_seconds=0.0,
                                              token_seconds=token)
            for _ in range(n):
                if on_token is not None:
                    on_token(0)
            return ids

    overhead, tps = measure_decode_overhead(None, engine=FakeEngine(), tokens=4, repeats=3)
    # runs: 5 - 4 = 1 ms, then 6 - 4 = 2 ms twice -> median 2 ms
    assert overhead == pytest.approx(0.002) and FakeEngine.runs == 3 and tps > 0


def test_benchmark_bytes_check_compares_the_planner_count_with_the_engine_count() -> None:
    bench = load_benchmark("decode_vs_llamacpp")
    rows = {"ours a fp32": {"runtime": "sparsetorch", "bytes_per_token": 100},
            "ours b fp16": {"runtime": "sparsetorch", "bytes_per_token": 50},
            "ours c int8": {"runtime": "sparsetorch", "bytes_per_token": 25},
            "llama.cpp F32": {"runtime": "llama.cpp", "bytes_per_token": 100}}
    out = bench.planner_bytes_check(rows, {"ours a fp32": 100, "ours b fp16": 52})
    assert out == {"equal": ["ours a fp32"], "different": {"ours b fp16": {"planner": 52, "engine": 50}},
                   "skipped": ["ours c int8"]}


def test_estimates_say_whether_their_kernel_costs_were_streamed() -> None:
    """Given kernel costs: weight_s comes from them, and the estimate records whether they were
    measured streaming through a working set (as measured) or in cache (a roofline)."""
    from sparsetorch.inference.plan import KernelCost, decode_matrix_costs, kernel_kinds

    model = tiny_llama(seed=2)
    prune_half(model)
    kinds = kernel_kinds(decode_matrix_costs(model, "fp16"))
    for ws in (0, 10**6):
        kc = {k: KernelCost(1e-9, 0.0, ws) for k in kinds}
        (est,) = decode_estimates(model, ("fp16",), bandwidth_gb_per_s=10.0, overhead_s=0.001, kernel_costs=kc)
        assert est.weight_s is not None and est.streamed == bool(ws) and est.to_dict()["streamed"] == bool(ws)
