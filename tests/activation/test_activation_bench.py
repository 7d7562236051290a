"""benchmarks/activation_llm.py's pure parts: the row grammar and the table's target lines."""

from __future__ import annotations

import pytest
from bench_module import load_benchmark

bench = load_benchmark("activation_llm")


@pytest.mark.parametrize("spec,want", [
    ("teal@0.4", ("", "teal@0.4", "fp32")),
    ("teal@0.4:greedy", ("", "teal@0.4:greedy", "fp32")),
    ("sparsegpt50", ("sparsegpt50", "", "fp32")),
    ("sparsegpt50+teal@0.4/fp16", ("sparsegpt50", "teal@0.4", "fp16")),
    ("dense/fp16", ("", "", "fp16")),
])
def test_rows_parse(spec: str, want: tuple[str, str, str]) -> None:
    assert bench.parse_row(spec, engine=True) == want


def test_a_dtype_needs_the_engine() -> None:
    with pytest.raises(SystemExit, match="needs --engine"):
        bench.parse_row("teal@0.4/fp16", engine=False)


def _row(spec: str, speedup: float, ratio: float, dtype: str = "fp32", by: dict | None = None) -> dict:
    w, a, _ = bench.parse_row(spec, engine=True)
    return {"row": spec, "weights": w or "dense", "activation": a or None, "dtype": dtype,
            "activation_sparsity_measured": 0.4, "ppl": 14.67 * ratio, "ppl_ratio": ratio,
            "tokens_per_s": 30 * speedup, "dense_tokens_per_s": 30.0, "decode_speedup": speedup,
            "kernel_counts": {"dense-t": 120}, "decode_by_threads": by or {}}


def test_table_targets_and_thread_columns() -> None:
    d = {"ppl_dense": 14.67, "threads": [2, 1], "rows": [
        _row("teal@0.4", 1.30, 1.12, by={"1": {"decode_speedup": 1.4}}),
        _row("teal@0.4:greedy", 1.26, 1.09, by={"1": {"decode_speedup": 1.35}}),
        _row("sparsegpt50+teal@0.4/fp16", 2.6, 1.7, "fp16"),
    ]}
    text = bench.table(d)
    assert "| speedup 1 thr |" in text and "| 1.40 |" in text and "| - |" in text
    assert "sparsegpt50 (fp16)" in text
    assert "TEAL 40% (teal@0.4): decode x1.30 (>= 1.25) with E16 x1.120 (<= 1.10): MISSED" in text
    assert "TEAL 40% (teal@0.4:greedy): decode x1.26 (>= 1.25) with E16 x1.090 (<= 1.10): met" in text
    assert "(sparsegpt50+teal@0.4/fp16, fp16 values against the fp32 dense engine): decode x2.60 (>= 2.5): met" in text
