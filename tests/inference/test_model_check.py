"""sparsify_for_inference checks a whole forward against dense and puts back what does not pay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsetorch
from sparsetorch.inference import SparseLinear, sparsify_for_inference

pytest.importorskip("scipy")

#: per-layer sparse time by output width (dense = 1.0): layer 0 5x, layer 2 1.67x, layer 4 1.11x
_SPARSE_TIME = {96: 0.2, 64: 0.6, 10: 0.9}


def _layer_timer(name, fn):
    out = fn()
    return 1.0 if name == "dense" else _SPARSE_TIME[out.shape[-1]]


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(40, 96), nn.GELU(), nn.Linear(96, 64), nn.GELU(), nn.Linear(64, 10))
    sparsetorch.prune(m, "magnitude", 0.8)
    return m.eval()


def _run(model_times: dict[str, float]):
    m = _tiny()
    originals = {i: m[i] for i in (0, 2, 4)}
    x = torch.randn(1, 40)
    with torch.no_grad():
        ref = m(x)
    seen: list[str] = []

    def model_timer(name, fn):
        fn()  # the forward really runs under the subset being timed
        seen.append(name)
        return model_times[name.removeprefix("model:")]

    rep = sparsify_for_inference(m, kernels=["scipy"], timer=_layer_timer, example_input=lambda: m(x),
                                 model_timer=model_timer)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    return m, originals, rep, seen


def test_subsets_are_nested_by_predicted_speedup() -> None:
    _, _, rep, seen = _run({"dense": 1.0, "all": 0.5, ">=1.5x": 0.6, ">=2x": 0.7})
    # >=3x selects the same single layer as >=2x, so it is not timed twice
    assert seen == ["model:dense", "model:all", "model:>=1.5x", "model:>=2x"]
    assert rep.model_check is not None and rep.model_check.chosen == "all"
    assert len(rep.replaced) == 3 and not rep.reverted


def test_everything_put_back_when_the_whole_forward_is_slower() -> None:
    m, originals, rep, _ = _run({"dense": 1.0, "all": 1.3, ">=1.5x": 1.1, ">=2x": 0.99})
    # 0.99 is inside the 5% margin: not a real win, dense is kept
    assert rep.model_check.chosen == "dense" and rep.model_check.speedup == 1.0
    assert all(m[i] is originals[i] for i in (0, 2, 4))  # the original nn.Linear objects are back
    assert not rep.replaced and {c.name for c in rep.reverted} == {"0", "2", "4"}
    assert all(c.kernel == "dense" and c.reverted_from == "scipy" for c in rep.reverted)
    assert rep.linear_speedup == 1.0  # the report describes the model as it now is
    assert "put back to dense" in str(rep) and rep.to_dict()["reverted"] == ["0", "2", "4"]


def test_only_the_layers_of_the_fastest_subset_stay_sparse() -> None:
    m, originals, rep, _ = _run({"dense": 1.0, "all": 0.9, ">=1.5x": 0.8, ">=2x": 0.7})
    assert rep.model_check.chosen == ">=2x"
    assert isinstance(m[0], SparseLinear)
    assert m[2] is originals[2] and m[4] is originals[4]
    assert [c.name for c in rep.replaced] == ["0"] and {c.name for c in rep.reverted} == {"2", "4"}
    assert rep.model_check.speedup == pytest.approx(1.0 / 0.7)


def test_real_measurement_runs_interleaved_and_keeps_outputs(tiny_llama) -> None:
    m = tiny_llama
    sparsetorch.prune(m, "magnitude", 0.8)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    # fake layer times make every layer sparse; the model check is real (HF decode step input)
    rep = sparsify_for_inference(m, kernels=["scipy"], timer=lambda n, fn: 1.0 if n == "dense" else 0.1,
                                 model_timer=None, check_model=True)
    assert rep.model_check is None  # a fake layer timer without model_timer: the check is skipped
    rep2 = sparsify_for_inference(m, kernels=["scipy"], rounds=3)
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, ref, atol=1e-4, rtol=1e-4)
    mc = rep2.model_check
    if rep2.replaced or rep2.reverted:  # something was chosen per layer, so the model was checked
        assert mc is not None and mc.rounds == 3 and "dense" in mc.seconds and mc.chosen in mc.seconds
        assert mc.chosen == "dense" or mc.seconds[mc.chosen] <= mc.seconds["dense"] * (1 - mc.margin)


def test_check_model_false_keeps_the_per_layer_choice() -> None:
    m = _tiny()
    rep = sparsify_for_inference(m, kernels=["scipy"], timer=_layer_timer, example_input=lambda: m(torch.randn(1, 40)),
                                 model_timer=lambda n, fn: 9.0 if n != "model:dense" else 1.0, check_model=False)
    assert rep.model_check is None and len(rep.replaced) == 3


def test_interleaved_medians_runs_setup_before_each_block_and_rotates() -> None:
    from sparsetorch.inference.bench import interleaved_medians

    log: list[str] = []
    fns = {k: (lambda k=k: log.append(k)) for k in "abc"}
    setup = {k: (lambda k=k: log.append(k.upper())) for k in "abc"}
    out = interleaved_medians(fns, repeats=2, rounds=3, setup=setup)
    assert set(out) == {"a", "b", "c"} and all(v >= 0 for v in out.values())
    blocks = "".join(log)
    assert blocks.startswith("AaBbCc")  # warm-up: one call each after its setup
    assert blocks[6:] == "AaaBbbCcc" + "BbbCccAaa" + "CccAaaBbb"  # rounds rotate the order


def test_decode_tokens_per_s_is_the_median_not_the_best(monkeypatch) -> None:
    from sparsetorch.inference import bench

    monkeypatch.setattr(bench, "decode_runs", lambda *a, **k: [10.0, 30.0, 11.0])
    assert bench.decode_tokens_per_s(None, None) == 11.0


def test_decode_runs_measures_each_repeat(tiny_llama) -> None:
    from sparsetorch.inference.bench import decode_runs

    ids = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(0))
    runs = decode_runs(tiny_llama.eval(), ids, new_tokens=3, repeats=4)
    assert len(runs) == 4 and all(r > 0 for r in runs)


def test_decode_runs_feeds_the_kv_cache_without_deprecated_arguments(tiny_llama) -> None:
    """Every decode step passes one new token plus the cache the previous step returned, under the
    current transformers name (``past_key_values=`` warns from 5.24 and is removed in 5.40)."""
    import warnings

    from sparsetorch.inference.bench import decode_runs

    seen = []

    def pre(_mod, args, kwargs):  # noqa: ANN001, ANN202
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen.append((kwargs["input_ids"].shape[1], None if cache is None else cache.get_seq_length()))

    model = tiny_llama.eval()
    handle = model.register_forward_pre_hook(pre, with_kwargs=True)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            decode_runs(model, ids, new_tokens=3, repeats=1)
    finally:
        handle.remove()
    # prefill of 5 tokens without a cache, then 3 single-token steps on a cache of 5, 6, 7 positions
    assert seen == [(5, None), (1, 5), (1, 6), (1, 7)]


def test_timers_wait_for_queued_gpu_work(monkeypatch) -> None:
    """GPU kernels run asynchronously: every host-clock timer must synchronize before reading
    the clock after the timed work, else it measures launch time (CUDA faked: hooks recorded)."""
    import time

    from sparsetorch.inference import bench, select

    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    real = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: (events.append("clock"), real())[1])

    def work() -> None:
        events.append("work")

    def clock_after_work_is_synced() -> None:
        last_work = max(i for i, e in enumerate(events) if e == "work")
        after = events[last_work + 1:]
        assert "clock" in after and after.index("sync") < after.index("clock"), events

    select.mean_timer("k", work, repeats=4, warmup=1)
    clock_after_work_is_synced()
    events.clear()
    bench.interleaved_medians({"a": work}, repeats=2, rounds=1)
    clock_after_work_is_synced()
    # and without CUDA in use, no synchronize is attempted
    events.clear()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    select.mean_timer("k", work, repeats=3, warmup=0)
    assert "sync" not in events
