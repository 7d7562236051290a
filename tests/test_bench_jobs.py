"""benchmarks/_jobs.py: the resumable-job skeleton of dp_sparse.py and learned_sparsity.py (done
keys skipped, saved after every job, wall time and provenance on each entry, failures recorded)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def jobs():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("_jobs")  # as the benchmarks import it


def _setup(jobs, path: Path, results: dict):
    run = jobs.Run(argv=["bench"])
    saved: list[dict] = []
    inner = jobs.saver(path, results, run, {"model": "toy"}, lambda r: {"summary": sorted(k for k in r if k[0] != "_" and k != "summary")})

    def save() -> None:
        inner()
        saved.append(json.loads(path.read_text()))

    return run, save, saved


def test_skips_done_keys_saves_after_each_job_and_stamps_entries(jobs, tmp_path) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"a": {"x": 0}}))
    results = jobs.load_results(path)
    run, save, saved = _setup(jobs, path, results)
    ran: list[int] = []

    def do(x: int) -> dict:
        ran.append(x)
        return {"x": x}

    todo = [jobs.Job("a", 1), jobs.Job("b", 2), jobs.Job("c", 3, section="_extra")]
    jobs.run_jobs(results, todo, do, run=run, save=save, report=lambda j, e: f"{j.key} {e['x']}",
                  after=lambda j, e: e.update(after=j.key))
    assert ran == [2, 3]  # "a" was in the file already
    assert len(saved) == 2 and "b" in saved[0] and "_extra" not in saved[0]
    final = json.loads(path.read_text())
    assert final["a"] == {"x": 0} and final["_extra"]["c"]["x"] == 3 and final["b"]["after"] == "b"
    for e in (final["b"], final["_extra"]["c"]):
        assert e["wall_seconds"] >= 0 and "load_before" in e["provenance"]
    assert final["summary"] == ["a", "b"] and final["_meta"]["model"] == "toy"  # refreshed on each save
    # a rerun skips everything (also in a section); redo reruns
    jobs.run_jobs(results, todo, do, run=run, save=save, report=lambda j, e: "")
    assert ran == [2, 3]
    jobs.run_jobs(results, todo[:1], do, run=run, save=save, report=lambda j, e: "", redo=True)
    assert ran == [2, 3, 1] and json.loads(path.read_text())["a"]["x"] == 1


def test_failures_are_recorded_when_asked_and_raised_otherwise(jobs, tmp_path) -> None:
    path = tmp_path / "r.json"
    results = jobs.load_results(path)
    assert results == {}
    run, save, saved = _setup(jobs, path, results)

    def do(x: int) -> dict:
        if x < 0:
            raise ValueError("negative")
        return {"x": x}

    todo = [jobs.Job("bad", -1, failure_key="m|bad"), jobs.Job("good", 1)]
    jobs.run_jobs(results, todo, do, run=run, save=save, report=lambda j, e: "", failures="_failed")
    final = json.loads(path.read_text())
    assert final["_failed"] == {"m|bad": "ValueError: negative"} and final["good"]["x"] == 1
    assert "bad" not in final
    with pytest.raises(ValueError):
        jobs.run_jobs({}, todo, do, run=run, save=save, report=lambda j, e: "")


def test_an_empty_grid_still_writes_a_well_formed_file(jobs, tmp_path) -> None:
    path = tmp_path / "r.json"
    results: dict = {}
    run, save, _ = _setup(jobs, path, results)
    jobs.run_jobs(results, [], lambda x: {}, run=run, save=save, report=lambda j, e: "")
    assert set(json.loads(path.read_text())) == {"_meta", "summary"}
