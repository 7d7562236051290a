"""``sparsetorch train --method <learned method>``: bad input ends in one line and exit status 2,
through the installed console script; a tiny good run goes through."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def console_script() -> str:
    found = shutil.which("sparsetorch", path=str(Path(sys.executable).parent))
    assert found, f"the sparsetorch console script is not installed next to {sys.executable}"
    return found


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run([console_script(), *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "group_lasso", "--method-arg", "lam=-1"], "lam (lambda) must be a finite number >= 0"),
    (["--method", "kgroup", "--method-arg", "k=0"], "k (groups kept per layer) must be a positive integer"),
    (["--method", "group_lasso", "--method-arg", "groups=3:5"], "do not tile"),
    (["--method", "kgroup", "--method-arg", "groups=row", "--method-arg", "k=100000"], "groups cannot survive"),
    (["--method", "hypersparse", "--method-arg", "lamda=1"], "unknown option 'lamda'"),
    (["--method", "l0", "--method-arg", "novalue"], "needs KEY=VALUE"),
    (["--method", "dass", "--method-arg", "inner=nosuch"], "unknown training method"),
])
def test_bad_learned_options_exit_2_without_traceback(args: list[str], message: str) -> None:
    proc = run_script("train", "--train-subset", "256", "--no-progress", *args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    assert message in " ".join(out.split()), out


def test_a_tiny_learned_run(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = run_script("train", "--method", "ste_gates", "--sparsity", "0.9", "--train-subset", "512",
                      "--no-progress", "--threads", "1", "--method-arg", "update_every=2", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    assert res["method"] == "ste_gates"
    assert abs(res["sparsity_actual"] - 0.9) < 1e-3
