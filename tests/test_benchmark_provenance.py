"""Every benchmark JSON carries its provenance (benchmarks/_provenance.py), end to end.

Fast: ``checkpoint_size.py`` on a tiny Llama folder, ``sparse_inference.py`` with nothing to
measure, and the ``oneshot_llm.py`` driver with its per-config subprocess replaced by a stub; each
writes to a temporary path, and every ``_meta`` / per-entry field is checked against this
process (versions, CPU count, threads) or for its shape (commit, load average, date).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from bench_module import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _module(name: str):
    return load_benchmark(name)


prov = _module("_provenance")


def _git_head() -> str | None:
    try:
        p = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def _is_load(x) -> bool:
    return isinstance(x, list) and len(x) == 3 and all(isinstance(v, float) and v >= 0 for v in x)


def _recent_utc(s: str) -> bool:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", s), s
    t = time.mktime(time.strptime(s, "%Y-%m-%dT%H:%M:%SZ")) - time.mktime(time.gmtime(0))
    return abs(t - time.time()) < 600


def check_meta(meta: dict, script: str, argv_tail: list[str]) -> None:
    import numpy
    import transformers

    head = _git_head()
    assert meta["provenance_version"] == prov.PROVENANCE_VERSION
    if head is not None:
        assert meta["commit"] == head and re.fullmatch(r"[0-9a-f]{40}", meta["commit"])
        assert isinstance(meta["dirty"], bool)
        assert all(not p.startswith("benchmarks/results/") for p in meta["dirty_paths"])
    assert meta["argv"][0].endswith(script) and meta["argv"][1:] == argv_tail
    assert script in meta["command"] and all(a in meta["command"] for a in argv_tail)
    v = meta["versions"]
    assert v["python"] == platform.python_version()
    assert v["torch"] == torch.__version__
    assert v["transformers"] == transformers.__version__
    assert v["numpy"] == numpy.__version__
    if Path("/proc/cpuinfo").is_file():
        assert isinstance(meta["cpu_model"], str) and meta["cpu_model"]
    assert meta["cpu_count"] == os.cpu_count()
    assert meta["torch_threads"] == torch.get_num_threads()
    assert _is_load(meta["load_before"]) and _is_load(meta["load_after"])
    assert _recent_utc(meta["started_utc"]) and _recent_utc(meta["date_utc"])
    assert meta["started_utc"] <= meta["date_utc"]


def _no_hostname(text: str) -> None:
    host = socket.gethostname()
    if len(host) >= 6:  # a short name like "box" could occur by chance
        assert host not in text


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from tiny_models import make_tiny_llama

    from sparsetorch.data.llm import save_hf_model

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]")),
        unk_token="[UNK]",
    )
    return save_hf_model(make_tiny_llama(), tok, tmp_path / "tiny")


def test_checkpoint_size_writes_meta(tiny_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "res" / "checkpoint_size.json"
    argv = ["--model", str(tiny_folder), "--out", str(out)]
    assert _module("checkpoint_size").main(argv) == 0
    text = out.read_text()
    data = json.loads(text)
    check_meta(data["_meta"], "checkpoint_size.py", argv)
    assert [r["config"] for r in data["rows"]] == ["50%", "50%all", "70%", "90%", "2:4"]  # still measured
    _no_hostname(text)
    assert not list(out.parent.glob(".*tmp*")), "atomic write left a temporary file"


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_sparse_inference_runs_carry_their_own_provenance(tmp_path: Path, keep_threads) -> None:
    out = tmp_path / "inf.json"
    mod = _module("sparse_inference")
    argv = ["--quick", "--skip-layers", "--skip-decode", "--threads", "1", "--out", str(out)]
    assert mod.main(argv) == 0
    first = json.loads(out.read_text())
    check_meta(first["_meta"], "sparse_inference.py", argv)
    argv2 = [*argv, "--append"]
    assert mod.main(argv2) == 0
    data = json.loads(out.read_text())
    check_meta(data["_meta"], "sparse_inference.py", argv2)
    p0, p1 = (r["provenance"] for r in data["runs"])
    assert p0 == first["runs"][0]["provenance"]  # the earlier run keeps its own provenance
    assert p0["argv"][1:] == argv and p1["argv"][1:] == argv2
    for p in (p0, p1):
        assert _is_load(p["load_before"]) and _is_load(p["load_after"]) and _recent_utc(p["date_utc"])


def test_oneshot_driver_stamps_every_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _module("oneshot_llm")
    results = tmp_path / "oneshot.json"
    old = {"config": "wanda@0.5", "ppl": 27.5, "seconds": 250.0}  # from before provenance was kept
    results.write_text(json.dumps({"wanda@0.5": old}))
    calls = []

    def fake_run_one(cfg, model_dir, llmc_python, timeout, threads=None):
        calls.append(cfg)
        r = {"config": cfg, "ppl": 20.0, "seconds": 1.0, "peak_rss_gib": 1.0, "torch_threads": 1,
             "versions": {"python": "3.x", "torch": "9.9", "transformers": "8.8", "numpy": "7.7"}}
        if cfg.startswith("llmc-"):
            r["llmcompressor"] = "0.14.0.1"
        return r

    monkeypatch.setattr(mod, "run_one", fake_run_one)
    monkeypatch.setattr(mod, "ensure_model_dir", lambda: tmp_path)
    argv = [str(BENCH / "oneshot_llm.py"), "--configs", "sparsegpt@0.5,llmc-sparsegpt@0.5",
            "--results", str(results)]
    monkeypatch.setattr(sys, "argv", argv)
    mod.main()
    data = json.loads(results.read_text())
    assert calls == ["sparsegpt@0.5", "llmc-sparsegpt@0.5"]
    assert data["wanda@0.5"] == old  # merged, not rewritten
    check_meta(data["_meta"], "oneshot_llm.py", argv[1:])
    assert data["_meta"]["versions"]["llmcompressor"] == "0.14.0.1"
    for cfg in calls:
        p = data[cfg]["provenance"]
        assert p["commit"] == data["_meta"]["commit"] and p["argv"] == argv
        assert _is_load(p["load_before"]) and _is_load(p["load_after"]) and _recent_utc(p["date_utc"])
        # the worker's versions (llm-compressor runs in its own venv), not the driver's
        assert p["versions"]["torch"] == "9.9" and "versions" not in data[cfg]
        assert p["cpu_model"] == data["_meta"]["cpu_model"] and p["cpu_count"] == os.cpu_count()


def test_git_state_ignores_results_folder(tmp_path: Path) -> None:
    def git(*a: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True)

    try:
        git("init", "-q")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git unavailable")
    git("config", "user.email", "t@example.invalid")
    git("config", "user.name", "t")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "x.json").write_text("{}")
    (tmp_path / "code.py").write_text("a = 1\n")
    git("add", ".")
    git("commit", "-q", "-m", "init")
    clean = prov.git_state(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{40}", clean["commit"]) and clean["dirty"] is False
    (tmp_path / "benchmarks" / "results" / "x.json").write_text('{"a": 1}')
    (tmp_path / "benchmarks" / "results" / "new.json").write_text("{}")
    assert prov.git_state(tmp_path)["dirty"] is False  # the results being written do not count
    (tmp_path / "code.py").write_text("a = 2\n")
    st = prov.git_state(tmp_path)
    assert st["dirty"] is True and st["dirty_paths"] == ["code.py"]
    assert prov.git_state(tmp_path / "nowhere")["commit"] is None


def test_write_json_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sparsetorch.atomic as atomic

    seen = []
    real = atomic.atomic_write_text
    monkeypatch.setattr(atomic, "atomic_write_text", lambda p, t, **k: (seen.append(Path(p)), real(p, t, **k)))
    prov.write_json(tmp_path / "a" / "b.json", {"x": 1})
    assert seen == [tmp_path / "a" / "b.json"]
    assert json.loads((tmp_path / "a" / "b.json").read_text()) == {"x": 1}


# --------------------------------------------------------------------------- like-for-like driver
def test_vs_llmc_driver_rotates_and_summarizes(tmp_path, monkeypatch):
    vs = _module("oneshot_vs_llmc")
    cfgs = vs.matrix(["0.5"], [1, 8])
    assert cfgs == ["sparsegpt-ref@0.5/b1", "llmc-sparsegpt@0.5/b1", "wanda@0.5/b1", "llmc-wanda@0.5/b1",
                    "sparsegpt-ref@0.5/b8", "llmc-sparsegpt@0.5/b8", "wanda@0.5/b8", "llmc-wanda@0.5/b8"]
    assert vs.rotated(["a", "b", "c"], 1) == ["b", "c", "a"] and vs.rotated(["a", "b", "c"], 4) == ["b", "c", "a"]
    s = vs.summarize([{"seconds": 10.0, "ppl": 2.0, "rss_after_prune_gib": 1.0, "torch_threads": 2, "batch_size": 1},
                      {"seconds": 14.0, "ppl": 2.0, "rss_after_prune_gib": 1.2, "torch_threads": 2},
                      {"seconds": 12.0, "ppl": 2.0, "rss_after_prune_gib": 1.1, "torch_threads": 2},
                      {"error": "boom"}])
    assert (s["n"], s["median_seconds"], s["min_seconds"], s["max_seconds"]) == (3, 12.0, 10.0, 14.0)
    assert s["spread"] == pytest.approx(4 / 12) and s["ppl"] == 2.0 and s["median_rss_after_prune_gib"] == 1.1
    assert vs.summarize([{"seconds": 1.0, "ppl": 2.0}, {"seconds": 1.0, "ppl": 2.5}])["ppl"] == [2.0, 2.5]
    assert vs.summarize([{"error": "x"}]) == {"n": 0}
    # the driver: every config once per round, the order rotated by one each round
    calls = []

    def fake_run_one(cfg, model_dir, llmc_python, timeout, threads=None):
        calls.append((cfg, threads))
        return {"config": cfg, "ppl": 20.0, "seconds": 1.0 + len(calls), "rss_after_prune_gib": 1.0,
                "torch_threads": threads, "batch_size": 1, "versions": {"python": "3.x"}}

    monkeypatch.setattr(vs, "run_one", fake_run_one)
    monkeypatch.setattr(vs, "ensure_model_dir", lambda: tmp_path)
    out = tmp_path / "vs.json"
    monkeypatch.setattr(sys, "argv", ["oneshot_vs_llmc.py", "--configs", "a@0.5/b1,b@0.5/b1,c@0.5/b1",
                                      "--repeats", "2", "--threads", "2", "--results", str(out)])
    vs.main()
    assert [c for c, _ in calls] == ["a@0.5/b1", "b@0.5/b1", "c@0.5/b1", "b@0.5/b1", "c@0.5/b1", "a@0.5/b1"]
    assert {t for _, t in calls} == {2}
    data = json.loads(out.read_text())
    assert data["a@0.5/b1"]["summary"]["n"] == 2 and [r["round"] for r in data["a@0.5/b1"]["runs"]] == [1, 2]
    assert data["_meta"]["rounds_done"] == 2 and data["_meta"]["threads"] == 2


def test_gpu_check_dry_run_on_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu_check.py runs its checks on the CPU (the GPU parts need a lent GPU), records
    the sender's commit over the GPU machine's possibly stale .git, and refuses cuda without one."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "g.json"
    assert mod.main(["--device", "cpu", "--quick", "--commit", "f" * 40, "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert [c["ok"] for c in d["checks"]] == [True] * 5
    assert d["_meta"]["commit"] == "f" * 40 and d["_meta"]["dirty"] is None
    assert "linear" not in d  # timing is GPU-only
    if not torch.cuda.is_available():
        assert mod.main(["--out", str(tmp_path / "no.json")]) == 2
        assert not (tmp_path / "no.json").exists()


def test_oneshot_merge_keeps_each_entrys_provenance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two drivers side by side write one file each; --merge joins them without restamping, and a
    driver's unchanged copy of an entry the other driver reran does not win over the rerun."""
    mod = _module("oneshot_llm")
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "out.json"
    ea = {"config": "wanda@0.5", "ppl": 27.5, "seconds": 250.0, "provenance": {"commit": "aaa"}}
    eb = {"config": "llmc-wanda@0.5", "ppl": 27.6, "seconds": 300.0, "llmcompressor": "0.14.0.1",
          "provenance": {"commit": "bbb"}}
    stale = {"ppl": 9.0}  # what out.json held before both drivers started from a copy of it
    a.write_text(json.dumps({"_meta": {"model": "m", "machine": "x86_64, 2 CPUs"}, "wanda@0.5": ea,
                             "llmc-wanda@0.5": stale}))
    b.write_text(json.dumps({"_meta": {"model": "m"}, "llmc-wanda@0.5": eb, "wanda@0.5": stale}))
    earlier = {"commit": "c" * 40, "cpu_model": "AMD EPYC"}  # a driver of an earlier merge
    out.write_text(json.dumps({"old@0.5": {"ppl": 1.0}, "wanda@0.5": stale, "llmc-wanda@0.5": stale,
                               "_meta": {"merged_from": {"old-lane.json": earlier}}}))
    argv = [str(BENCH / "oneshot_llm.py"), "--merge", str(a), str(b), "--results", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    mod.main()
    data = json.loads(out.read_text())
    assert data["wanda@0.5"] == ea and data["llmc-wanda@0.5"] == eb and data["old@0.5"] == {"ppl": 1.0}
    meta = data["_meta"]
    assert set(meta["merged_from"]) == {"old-lane.json", "a.json", "b.json"}  # earlier drivers kept
    assert meta["merged_from"]["old-lane.json"] == earlier
    assert meta["machine"] == "x86_64, 2 CPUs; 2 drivers side by side" and meta["model"] == "m"
    assert meta["versions"]["llmcompressor"] == "0.14.0.1"
    check_meta(meta, "oneshot_llm.py", argv[1:])
