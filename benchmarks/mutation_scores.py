"""Mutation testing of the core modules: how many planted bugs (mutmut mutants) the tests catch.

Each module named in ``MODULES`` is mutated by mutmut 3 (one small change per mutant: an
operator, a constant, a removed call ...) and the tests that cover the mutated function are run
against each mutant. A mutant is *killed* when a test fails (or times out), *survives* when
every test passes. Target (issue 18): at least 90% killed per module, with mutants judged
equivalent to the original (no test could ever tell them apart) listed by hand, with a reason,
in ``benchmarks/mutation_equivalent.txt`` and left out of the score.

The run happens in a copy of the tree (``--workdir``), so the checkout is never touched; mutmut
keeps its state there, so a second run with the same ``--workdir`` resumes. ``make mutation``
runs it for every module.

    python benchmarks/mutation_scores.py                       # all modules (long)
    python benchmarks/mutation_scores.py --module patterns     # one module
    python benchmarks/mutation_scores.py --report-only         # re-read the last run's results

Writes ``benchmarks/results/mutation.json``: per module killed / timeout / survived / no tests,
the score, and the names of the surviving mutants (``mutmut show NAME`` in the workdir prints
the change).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import ROOT, Run, write_json  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "mutation.json"
EQUIVALENT = ROOT / "benchmarks" / "mutation_equivalent.txt"
TARGET = 0.90

#: short name -> (source file, the test folders that exercise it)
MODULES: dict[str, tuple[str, list[str]]] = {
    "patterns": ("src/sparsetorch/patterns.py", ["tests/core"]),
    "allocation": ("src/sparsetorch/allocation.py", ["tests/core", "tests/training"]),
    "masks": ("src/sparsetorch/masks.py", ["tests/core", "tests/training"]),
    "export.formats": ("src/sparsetorch/export/formats.py", ["tests/export"]),
    "export.reader": ("src/sparsetorch/export/reader.py", ["tests/export"]),
    "oneshot.sparsegpt": ("src/sparsetorch/oneshot/sparsegpt.py", ["tests/oneshot"]),
    "oneshot.wanda": ("src/sparsetorch/oneshot/wanda.py", ["tests/oneshot"]),
    "training._dst": ("src/sparsetorch/training/_dst.py", ["tests/training"]),
}


def _config(files: list[str], tests: list[str]) -> str:
    def arr(xs: list[str]) -> str:
        return "[" + ", ".join(json.dumps(x) for x in xs) + "]"

    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["src"]\n'
        f"only_mutate = {arr(files)}\n"
        f"pytest_add_cli_args_test_selection = {arr(sorted(set(tests)))}\n"
        'pytest_add_cli_args = ["-q", "-x", "-m", "not slow", "-p", "no:cacheprovider"]\n'
    )


def prepare(workdir: Path, files: list[str], tests: list[str]) -> None:
    """Copy src/, tests/ and pyproject.toml into ``workdir`` and append the mutmut config."""
    workdir.mkdir(parents=True, exist_ok=True)
    for sub in ("src", "tests"):
        shutil.copytree(ROOT / sub, workdir / sub, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    text = text.split("\n[tool.mutmut]")[0]
    (workdir / "pyproject.toml").write_text(text + _config(files, tests), encoding="utf-8")


def _mutmut() -> str:
    exe = Path(sys.executable).with_name("mutmut")
    if not exe.is_file():
        raise SystemExit("mutmut is not installed in this environment: pip install 'mutmut==3.8.1'")
    return str(exe)


def results(workdir: Path) -> dict[str, str]:
    """``{mutant name: status}`` of every mutant mutmut knows in ``workdir``."""
    out = subprocess.run([_mutmut(), "results", "--all", "true"], cwd=workdir, capture_output=True,
                         text=True, check=True).stdout
    res = {}
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and name:
            res[name] = status.strip()
    return res


def module_of(mutant: str) -> str:
    """``sparsetorch.patterns.x_parse_pattern__mutmut_3`` -> ``patterns``; methods use ``xǁ``."""
    dotted = mutant.split("__mutmut_")[0]
    parts = dotted.split(".")
    keep = [p for p in parts if not (p.startswith("x_") or p.startswith("xǁ"))]
    return ".".join(keep[1:]) if keep and keep[0] == "sparsetorch" else ".".join(keep)


def equivalent() -> dict[str, str]:
    """Mutants judged equivalent by hand: ``NAME  # reason`` per line."""
    if not EQUIVALENT.is_file():
        return {}
    out = {}
    for line in EQUIVALENT.read_text(encoding="utf-8").splitlines():
        name, _, reason = line.partition("#")
        if name.strip():
            out[name.strip()] = reason.strip()
    return out


def score(res: dict[str, str], modules: list[str]) -> dict[str, dict]:
    eq = equivalent()
    table = {}
    for mod in modules:
        mine = {k: v for k, v in res.items() if module_of(k) == mod}
        counts = Counter(v for k, v in mine.items() if k not in eq)
        caught = counts["killed"] + counts["timeout"]
        judged = caught + counts["survived"] + counts["no tests"] + counts["suspicious"]
        table[mod] = {
            "mutants": len(mine),
            "killed": counts["killed"],
            "timeout": counts["timeout"],
            "survived": counts["survived"],
            "no_tests": counts["no tests"],
            "suspicious": counts["suspicious"],
            "not_checked": counts["not checked"],
            "equivalent_excluded": sum(1 for k in mine if k in eq),
            "score": caught / judged if judged else None,
            "target_met": bool(judged) and caught / judged >= TARGET and not counts["not checked"],
            "survivors": sorted(k for k, v in mine.items() if k not in eq and v in ("survived", "no tests")),
        }
    return table


def main(argv: list[str] | None = None) -> int:
    run = Run.for_main(__file__, argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--module", action="append", choices=sorted(MODULES), help="repeatable; default: all")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "sparsetorch-mutation")
    ap.add_argument("--max-children", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--report-only", action="store_true", help="do not run mutmut; score its last results")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    mods = a.module or sorted(MODULES)
    files = [MODULES[m][0] for m in mods]
    tests = [t for m in mods for t in MODULES[m][1]]
    if not a.report_only:
        prepare(a.workdir, files, tests)
        # one OpenMP thread: mutmut forks a worker per mutant from a process where torch has
        # started its thread pool, and libgomp is not fork-safe; measured here, the workers then
        # hung on a futex at 0% CPU (mutmut's CPU-time limit never fires), ~10x slower overall
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        subprocess.run([_mutmut(), "run", "--max-children", str(a.max_children)], cwd=a.workdir,
                       stdout=subprocess.DEVNULL, check=False, env=env)
    table = score(results(a.workdir), mods)
    print(f"{'module':<20} {'mutants':>7} {'killed':>7} {'timeout':>7} {'survived':>8} {'no tests':>8} "
          f"{'equiv':>5} {'score':>7}  target {TARGET:.0%}")
    for mod, t in table.items():
        sc = "-" if t["score"] is None else f"{t['score']:.1%}"
        print(f"{mod:<20} {t['mutants']:>7} {t['killed']:>7} {t['timeout']:>7} {t['survived']:>8} "
              f"{t['no_tests']:>8} {t['equivalent_excluded']:>5} {sc:>7}  {'met' if t['target_met'] else 'MISSED'}")
    prev = json.loads(a.out.read_text()) if a.out.is_file() else {}
    merged = {**prev.get("modules", {}), **table}
    write_json(a.out, {"_meta": run.meta(peers={"mutmut": None}, target=TARGET,
                                          note="score = (killed + timeout) / (all - equivalent - not checked)"),
                       "modules": merged})
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
