"""The CLI exposes `plan` and `bench inference` (model loading itself is covered elsewhere)."""

from __future__ import annotations

from typer.testing import CliRunner

from sparsetorch.cli import app


def test_plan_and_bench_inference_are_registered() -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["plan", "--help"])
    assert res.exit_code == 0 and "--batch" in res.output
    res = runner.invoke(app, ["bench", "inference", "--help"])
    assert res.exit_code == 0 and "--model" in res.output
