"""Load a script under ``benchmarks/`` as a module (for tests of its pure functions)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):  # noqa: ANN201 - a module
    """``benchmarks/<name>.py`` as module ``bench_<name>`` (benchmarks/ on ``sys.path`` for its imports)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
