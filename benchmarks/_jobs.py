"""The resumable-job skeleton of grid benchmarks (``dp_sparse.py``, ``learned_sparsity.py``).

A grid run can take hours on a shared machine and may be stopped part-way. So its results JSON
is the run's state: entries are keyed (``EPS|SPARSITY|SEED``, ``METHOD|SPARSITY|SEED`` ...), a
rerun skips the keys already there (``redo`` reruns them), and the file is rewritten atomically
after every job, with the derived blocks (``_meta``, ``summary``, ``verdict``) refreshed. Every
entry carries its own wall time and provenance (:meth:`Run.entry`: commit, command, machine load
before and after), because entries of one file come from different runs.

Only the skeleton lives here; what a job runs, how its entry is named and what the derived
blocks say stay in each benchmark. Like ``_provenance``, nothing heavy is imported.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from _provenance import Run, load_average, write_json

T = TypeVar("T")


def load_results(path: Path) -> dict:
    """The results JSON at ``path``, or ``{}`` where there is none yet (a first run)."""
    return json.loads(path.read_text()) if path.is_file() else {}


def saver(path: Path, results: dict, run: Run, meta: dict[str, Any],
          derive: Callable[[dict], dict[str, Any]]) -> Callable[[], None]:
    """``save()`` for :func:`run_jobs`: refreshes ``_meta`` (``run.meta(**meta)``) and the blocks
    ``derive(results)`` returns (e.g. ``summary``, ``verdict``), then writes ``results`` to
    ``path`` atomically (:func:`write_json`)."""
    def save() -> None:
        results["_meta"] = run.meta(**meta)
        results.update(derive(results))
        write_json(path, results)

    return save


@dataclass(frozen=True)
class Job(Generic[T]):
    """One job of a grid: ``spec`` is what the benchmark's ``do`` reads."""

    #: the entry's key (what a rerun looks for)
    key: str
    spec: T
    #: the entries live in ``results[section]`` (None: at the top level of the results)
    section: str | None = None
    #: the key of a failure in ``results[failures]`` (default: ``key``)
    failure_key: str | None = None


def run_jobs(
    results: dict,
    jobs: Iterable[Job[T]],
    do: Callable[[T], dict],
    *,
    run: Run,
    save: Callable[[], None],
    report: Callable[[Job[T], dict], str],
    redo: bool = False,
    after: Callable[[Job[T], dict], None] | None = None,
    failures: str | None = None,
) -> None:
    """Run the jobs whose keys ``results`` lacks (all with ``redo``), saving after each one.

    For each job: ``entry = do(job.spec)``; then ``wall_seconds`` (the time of ``do``) and
    ``provenance`` (machine load before ``do`` and after it) are added; then ``after(job, entry)``
    (work on the finished run that is not part of its time, e.g. shrinking and timing the
    result); the entry is stored under its key, ``report(job, entry)`` printed, and
    ``save()`` called. With ``failures`` set, a job that raises is recorded as
    ``results[failures][failure_key] = "Type: message"`` (saved, not fatal); without it, the
    exception propagates. If no job ran and the file has no ``_meta`` yet, it is saved once (so
    even an empty grid leaves a well-formed file).
    """
    for job in jobs:
        done = results.get(job.section, {}) if job.section else results
        if job.key in done and not redo:
            continue
        load_before = load_average()
        t = time.perf_counter()
        try:
            entry = do(job.spec)
        except Exception as exc:  # noqa: BLE001 - recorded when the caller asks for it
            if failures is None:
                raise
            print(f"{job.key}: FAILED {type(exc).__name__}: {exc}", flush=True)
            results.setdefault(failures, {})[job.failure_key or job.key] = f"{type(exc).__name__}: {exc}"
            save()
            continue
        entry["wall_seconds"] = time.perf_counter() - t
        entry["provenance"] = run.entry(load_before)
        if after is not None:
            after(job, entry)
        (results.setdefault(job.section, {}) if job.section else results)[job.key] = entry
        print(report(job, entry), flush=True)
        save()
    if "_meta" not in results:
        save()
