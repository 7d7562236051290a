"""sparsify_for_inference keeps outputs; compile failures fall back; GPU path skips on CPU."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import sparsetorch
from sparsetorch.inference import SparseLinear, _ext, auto_candidates, plan, sparsify_for_inference


def _always_sparse_timer(name, fn):
    return 1.0 if name == "dense" else 0.1


def _tiny(sparsity: float = 0.8) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(40, 96), nn.GELU(), nn.Linear(96, 96), nn.GELU(), nn.Linear(96, 10))
    sparsetorch.prune(m, "magnitude", sparsity)
    return m.eval()


def test_outputs_unchanged_and_layers_replaced() -> None:
    m = _tiny()
    x = torch.randn(7, 40)
    with torch.no_grad():
        ref = m(x)
    rep = sparsify_for_inference(m, batch_size=7, timer=_always_sparse_timer)
    assert len(rep.replaced) == 3
    assert all(isinstance(m[i], SparseLinear) for i in (0, 2, 4))
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    assert "3/3" in str(rep) and rep.to_dict()["layers"][0]["kernel"] != "dense"


def test_dense_kept_when_sparse_is_slower_and_below_min_sparsity() -> None:
    m = _tiny(0.5)
    rep = sparsify_for_inference(m, min_sparsity=0.6, timer=_always_sparse_timer)
    assert all(isinstance(m[i], nn.Linear) for i in (0, 2, 4)) and not rep.replaced
    assert all("min_sparsity" in (c.skipped_reason or "") for c in rep.layers)
    m = _tiny(0.9)
    rep = sparsify_for_inference(m, timer=lambda name, fn: 1.0 if name == "dense" else 2.0)
    assert all(type(m[i]) is nn.Linear for i in (0, 2, 4)) and not rep.replaced


def test_tiny_llama_logits_match(tiny_llama) -> None:
    m = tiny_llama
    sparsetorch.prune(m, "magnitude", 0.7)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    rep = sparsify_for_inference(m, batch_size=1, timer=_always_sparse_timer)
    assert rep.replaced, rep
    # the tied lm_head shares its weight with the embedding and must stay a plain Linear
    assert any(c.name == "lm_head" and "shared" in (c.skipped_reason or "") for c in rep.layers)
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, ref, atol=1e-4, rtol=1e-4)


def test_compile_failure_falls_back(monkeypatch) -> None:
    def broken_build():
        raise OSError("g++: command not found")

    monkeypatch.setattr(_ext, "_build", broken_build)
    _ext.reset()
    try:
        with pytest.warns(RuntimeWarning, match="could not build"):
            cands = auto_candidates("cpu")
        assert "bitmask" not in cands and "csr" not in cands and "dense" in cands
        assert "g++" in (_ext.extension_error() or "")
        m = _tiny(0.9)
        x = torch.randn(3, 40)
        with torch.no_grad():
            ref = m(x)
        rep = sparsify_for_inference(m, timer=_always_sparse_timer)
        assert {c.kernel for c in rep.replaced} <= {"scipy"}
        with torch.no_grad():
            torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    finally:
        _ext.reset()


def test_no_compile_env(monkeypatch) -> None:
    monkeypatch.setenv("SPARSETORCH_NO_COMPILE", "1")
    _ext.reset()
    try:
        assert _ext.get_extension() is None and "SPARSETORCH_NO_COMPILE" in (_ext.extension_error() or "")
    finally:
        _ext.reset()


def test_plan_reports_no_speedup_plainly() -> None:
    m = _tiny(0.9)
    rep = plan(m, batch_size=1, timer=lambda name, fn: 1.0 if name in ("dense", "model") else 3.0)
    assert "no speedup expected" in str(rep)
    assert all(type(m[i]) is nn.Linear for i in (0, 2, 4))  # plan does not change the model


def test_plan_end_to_end_estimate() -> None:
    m = _tiny(0.9)
    times = {"dense": 1e-3, "model": 4e-3}
    rep = plan(m, batch_size=1, timer=lambda name, fn: times.get(name, 0.5e-3), example_input=lambda: m(torch.randn(1, 40)))
    # 3 layers: 3 ms dense -> 1.5 ms sparse; 1 ms other -> 2.5 ms total
    assert rep.expected_latency_s == pytest.approx(2.5e-3)
    assert rep.expected_speedup == pytest.approx(1.6)
    assert "expected speedup 1.60x end to end" in str(rep)
    assert rep.sparse_bytes < rep.model_bytes


def test_lazy_top_level_entry_point() -> None:
    assert sparsetorch.sparsify_for_inference is sparsify_for_inference


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured kernels need a CUDA GPU")
def test_semi_structured_on_gpu() -> None:  # pragma: no cover - GPU only
    from sparsetorch.inference.kernels import KERNELS

    k = KERNELS["semi_structured"]
    if not k.available():
        pytest.skip("torch.sparse.to_sparse_semi_structured unavailable")
    w = torch.randn(128, 128, device="cuda", dtype=torch.float16)
    keep = torch.zeros(128, 32, 4, dtype=torch.bool, device="cuda")
    keep[..., :2] = True
    w = (w.view(128, 32, 4) * keep).view(128, 128)
    assert k.supports(w) is None
    x = torch.randn(32, 128, device="cuda", dtype=torch.float16)
    y = k.matmul(x, k.pack(w), None, 128)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("env", [None, ""])
def test_machine_busy_without_proc_follows_the_load_average(monkeypatch, env) -> None:
    """Where other processes' CPU use cannot be read, busy means 1-minute load >= CPUs - 0.5
    (os.getloadavg monkeypatched, the real code path)."""
    import os

    from sparsetorch.inference import kernels

    if env is None:
        monkeypatch.delenv("SPARSETORCH_PARALLEL", raising=False)
    else:
        monkeypatch.setenv("SPARSETORCH_PARALLEL", env)  # empty = not set
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(kernels, "other_cpu_use", lambda: None)
    for load, busy in ((0.1, False), (3.4, False), (3.5, True), (8.0, True)):
        monkeypatch.setattr(kernels, "_busy_cache", [])
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
        assert kernels.machine_busy() is busy, load

    def no_loadavg():
        raise OSError("no load average here")

    monkeypatch.setattr(kernels, "_busy_cache", [])
    monkeypatch.setattr(os, "getloadavg", no_loadavg)
    assert kernels.machine_busy() is False


def test_machine_busy_counts_other_processes_not_this_one(monkeypatch) -> None:
    """Busy means other processes use >= max(CPUs - torch threads, 0) + 0.5 cores; this process's
    own ticks are subtracted (fake /proc readings: 4 CPUs' worth of ticks, 3 of them ours)."""
    import itertools
    import os

    from sparsetorch.inference import kernels

    monkeypatch.delenv("SPARSETORCH_PARALLEL", raising=False)
    hz = os.sysconf("SC_CLK_TCK")
    ticks = iter([(1000, 500), (1000 + 4 * hz, 500 + 3 * hz)])
    monkeypatch.setattr(kernels, "_cpu_ticks", lambda: next(ticks))
    clock = itertools.count(10.0, 1.0)  # one second per reading
    monkeypatch.setattr(kernels.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(kernels.time, "sleep", lambda s: None)
    assert kernels.other_cpu_use() == pytest.approx(1.0)  # one CPU's worth, not four
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))  # not consulted
    for other, threads, busy in ((0.0, 2, False), (0.4, 2, False), (0.5, 2, True), (1.4, 1, False), (1.5, 1, True)):
        monkeypatch.setattr(kernels, "_busy_cache", [])
        monkeypatch.setattr(kernels, "other_cpu_use", lambda other=other: other)
        monkeypatch.setattr(kernels.torch, "get_num_threads", lambda threads=threads: threads)
        assert kernels.machine_busy() is busy, (other, threads)


def test_other_cpu_use_reads_this_machine() -> None:
    from sparsetorch.inference import kernels

    other = kernels.other_cpu_use(0.05)
    if other is None:
        pytest.skip("no /proc here")
    assert 0.0 <= other <= (os.cpu_count() or 1) + 0.5


def test_busy_machine_gets_single_thread_kernels_only(monkeypatch) -> None:
    import os

    from sparsetorch.inference import kernels

    if _ext.get_extension() is None or torch.get_num_threads() < 2:
        pytest.skip("needs the compiled kernels and >1 torch thread")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.delenv("SPARSETORCH_PARALLEL", raising=False)
    monkeypatch.setattr(kernels, "_busy_cache", [])
    monkeypatch.setattr(kernels, "other_cpu_use", lambda: 2.0)
    assert auto_candidates("cpu") == ["dense", "bitmask_serial", "csr_serial"]
    monkeypatch.setattr(kernels, "_busy_cache", [])
    monkeypatch.setattr(kernels, "other_cpu_use", lambda: 0.0)
    assert "bitmask" in auto_candidates("cpu") and "csr" in auto_candidates("cpu")
    # the environment overrides the measurement both ways
    monkeypatch.setenv("SPARSETORCH_PARALLEL", "0")
    assert kernels.machine_busy() and "bitmask" not in auto_candidates("cpu")
    monkeypatch.setattr(kernels, "_busy_cache", [])
    monkeypatch.setattr(kernels, "other_cpu_use", lambda: 2.0)
    monkeypatch.setenv("SPARSETORCH_PARALLEL", "1")
    assert not kernels.machine_busy() and "bitmask" in auto_candidates("cpu")


def test_cache_dir_follows_sparsetorch_cache_dir(monkeypatch, tmp_path) -> None:
    """``$SPARSETORCH_CACHE_DIR`` wins, then ``$XDG_CACHE_HOME/sparsetorch``, then
    ``~/.cache/sparsetorch``; the kernel build goes under ``<cache>/kernels/``."""
    from pathlib import Path

    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv("SPARSETORCH_CACHE_DIR", str(tmp_path / "st"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _ext.cache_dir() == tmp_path / "st"
    monkeypatch.delenv("SPARSETORCH_CACHE_DIR")
    assert _ext.cache_dir() == tmp_path / "xdg" / "sparsetorch"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _ext.cache_dir() == Path(str(tmp_path / "home")) / ".cache" / "sparsetorch"

    seen = {}

    def fake_load_inline(**kw):
        seen.update(kw)
        return "module"

    monkeypatch.setattr(cpp, "load_inline", fake_load_inline)
    monkeypatch.setenv("SPARSETORCH_CACHE_DIR", str(tmp_path / "st"))
    assert _ext._build() == "module"
    build = Path(seen["build_directory"])
    assert build.parent == tmp_path / "st" / "kernels" and build.is_dir()
    assert build.name == seen["name"] and build.name.startswith("sparsetorch_kernels_")
    # the folder is keyed by the source (+ torch, CPU, Python): a different source, a new folder
    monkeypatch.setattr(_ext, "SOURCE", _ext.SOURCE + "\n// changed")
    _ext._build()
    assert Path(seen["build_directory"]) != build
