"""``sparsetorch train --dp-epsilon``: through the installed console script."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from test_cli_errors import run_script  # noqa: E402
from test_recipes_data_cli import _fake_fmnist  # noqa: E402

pytest.importorskip("opacus")


def test_private_sparse_training_writes_the_privacy_fields(tmp_path):
    _fake_fmnist(tmp_path, n=64)
    out = tmp_path / "dp.json"
    proc = run_script("train", "--method", "static", "--allocation", "erk", "--sparsity", "0.9",
                      "--model", "mlp", "--dp-epsilon", "3", "--dp-delta", "1e-5", "--dp-clip", "1.0",
                      "--batch-size", "16", "--epochs", "2", "--data-dir", str(tmp_path),
                      "--json", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["private"] is True and r["delta"] == 1e-5 and r["clip"] == 1.0
    assert 2.9 <= r["epsilon"] <= 3.0 and r["noise_multiplier"] > 0
    assert r["sample_rate"] == 16 / 64 and r["steps"] == 8
    assert r["sparsity_actual"] == pytest.approx(0.9, abs=0.01)
    assert "epsilon 2.9" in proc.stdout or "epsilon 3.0" in proc.stdout


SCRIPT_CASES = {"0", "rigl", "--dp-mask-is-public"}  # these three also through the console script


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dp-epsilon", "0"], "PrivacyError: epsilon must be a positive"),
        (["--dp-epsilon", "3", "--dp-delta", "1"], "PrivacyError: delta must lie in (0, 1)"),
        (["--dp-epsilon", "3", "--dp-clip", "0"], "PrivacyError: the clipping norm must be a positive"),
        (["--dp-epsilon", "3", "--dp-noise-multiplier", "1"], "PrivacyError: give exactly one"),
        (["--dp-epsilon", "3", "--dp-accountant", "gdp"], "PrivacyError: unknown accountant 'gdp'"),
        (["--dp-epsilon", "3", "--method", "rigl"], "PrivacyError: method 'rigl' changes the masks"),
        (["--dp-epsilon", "3", "--method", "snip"], "PrivacyError: method 'snip' chooses its mask"),
        (["--method", "static", "--dp-mask-is-public"], "DataError: --dp-mask-is-public only applies"),
        (["--dp-epsilon", "3", "--batch-size", "100"], "PrivacyError: the expected batch size"),
    ],
)
def test_bad_private_settings_exit_2_with_one_line_before_training(tmp_path, capsys, args, message):
    from test_cli_main import run

    _fake_fmnist(tmp_path, n=64)
    argv = ["train", "--model", "mlp", "--data-dir", str(tmp_path), "--no-progress",
            "--train-subset", "64", "--batch-size", "16",
            *(["--method", "static"] if "--method" not in args else []), *args]
    if SCRIPT_CASES & set(args):
        proc = run_script(*argv)
        code, err = proc.returncode, proc.stderr
    else:
        code, err = run(argv), capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
