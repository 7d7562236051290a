"""Provenance of benchmark results: where, when, with what and on what every number was measured.

Every script in ``benchmarks/`` builds the ``_meta`` block of its JSON with :meth:`Run.meta`
and writes the JSON with :func:`write_json` (atomically, through
``sparsetorch.atomic.atomic_write_text``). A script that merges entries from several runs into
one JSON (``oneshot_llm.py`` per config, ``sparse_inference.py --append`` per thread count,
``oneshot_llm_small.py`` per name) also stamps every entry with :meth:`Run.entry`, because the
entries come from different runs, commits and machine loads.

Recorded: git commit and whether the tree was dirty (changes under ``benchmarks/results/`` do
not count: the results file itself is rewritten as a run goes), the exact command line
(``sys.argv``), python/torch/transformers/numpy versions (plus peers, e.g. llm-compressor),
the CPU model (``/proc/cpuinfo``), ``os.cpu_count()``, torch's thread count, the 1/5/15-minute
load average when the run started and when the result was written, and the UTC date. No
hostname, no user name.

This module imports nothing heavy at import time (the llm-compressor worker imports it from
its own virtual environment).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: bump when the layout of the provenance fields changes (report.py reads it)
PROVENANCE_VERSION = 1
_RESULTS_DIR = "benchmarks/results/"


def load_average() -> list[float] | None:
    """The 1/5/15-minute load average, or None where the OS has none."""
    try:
        return [round(x, 3) for x in os.getloadavg()]
    except (OSError, AttributeError):  # pragma: no cover - not on Linux/macOS
        return None


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (``2026-12-01T20:05:31Z``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def git_state(root: Path = ROOT) -> dict[str, Any]:
    """``{"commit": sha | None, "dirty": bool | None, "dirty_paths": [...]}`` of the checkout.

    Dirty means tracked changes or untracked files outside ``benchmarks/results/``; the first
    20 such paths are listed so a reader can judge whether they could touch the measurement.
    """
    def git(*args: str) -> str | None:
        try:
            p = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                               timeout=30, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return p.stdout if p.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "dirty_paths": []}
    status = git("status", "--porcelain", "--untracked-files=normal")
    paths = []
    for line in (status or "").splitlines():
        path = line[3:].split(" -> ")[-1].strip().strip('"')
        if path and not path.startswith(_RESULTS_DIR):
            paths.append(path)
    return {"commit": commit.strip(), "dirty": bool(paths) if status is not None else None,
            "dirty_paths": paths[:20]}


def cpu_model() -> str | None:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _version(dist: str) -> str | None:
    mod = sys.modules.get(dist)
    v = getattr(mod, "__version__", None) if mod is not None else None
    if v is not None:
        return str(v)
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions(peers: dict[str, str | None] | None = None) -> dict[str, str | None]:
    """python, torch, transformers, numpy (and sparsetorch) versions of *this* process, plus peers.

    ``peers`` maps a peer tool's name to its version string (or to None to look it up as an
    installed distribution of that name), e.g. ``{"llmcompressor": "0.14.0.1"}``.
    """
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "numpy", "sparsetorch"):
        out[dist] = _version(dist)
    for name, ver in (peers or {}).items():
        out[name] = ver if ver is not None else _version(name)
    return out


def torch_threads() -> int | None:
    """torch's intra-op thread count now (None if torch was never imported by this process)."""
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else None


class Run:
    """One invocation of a benchmark script: created first thing, asked for provenance at write.

    ``argv`` is the command line to record; by default ``sys.argv``. A script whose ``main``
    takes an argument list records ``[script, *argv]`` when it is called in-process.
    """

    def __init__(self, argv: list[str] | None = None) -> None:
        self.argv = [str(a) for a in (sys.argv if argv is None else argv)]
        self.started = utc_now()
        self.load_before = load_average()
        self.git = git_state()

    @classmethod
    def for_main(cls, script: str, argv: list[str] | None) -> Run:
        """The Run of ``main(argv)``: ``sys.argv`` from the shell, ``[script, *argv]`` in-process."""
        return cls(None if argv is None else [script, *argv])

    @property
    def command(self) -> str:
        """The command line as one shell-quoted string (the interpreter is ``versions()['python']``)."""
        return shlex.join(self.argv)

    def entry(self, load_before: list[float] | None = None, **extra: Any) -> dict[str, Any]:
        """Compact provenance of one entry of a merged JSON (its own commit, command and load).

        ``load_before`` is the load average taken just before this entry was measured (default:
        the load at the start of the run); the load after is taken now.
        """
        return {
            "provenance_version": PROVENANCE_VERSION,
            "commit": self.git["commit"],
            "dirty": self.git["dirty"],
            "command": self.command,
            "argv": self.argv,
            "date_utc": utc_now(),
            "load_before": self.load_before if load_before is None else load_before,
            "load_after": load_average(),
            "torch_threads": torch_threads(),
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            **extra,
        }

    def meta(self, peers: dict[str, str | None] | None = None, **fields: Any) -> dict[str, Any]:
        """The ``_meta`` block: provenance of this run plus the script's descriptive ``fields``."""
        return {
            **fields,
            "provenance_version": PROVENANCE_VERSION,
            "commit": self.git["commit"],
            "dirty": self.git["dirty"],
            "dirty_paths": self.git["dirty_paths"],
            "command": self.command,
            "argv": self.argv,
            "versions": versions(peers),
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch_threads(),
            "load_before": self.load_before,
            "load_after": load_average(),
            "started_utc": self.started,
            "date_utc": utc_now(),
        }


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (a reader never sees half a file)."""
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    from sparsetorch.atomic import atomic_write_text

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(obj, indent=2) + "\n")
