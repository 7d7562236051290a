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


def test_dp_defaults_apply_when_only_a_noise_multiplier_is_given(tmp_path):
    # --dp-delta, --dp-clip and --dp-accountant default to None (so that they can be refused
    # without DP-SGD); with DP-SGD on they resolve to the documented 1e-5, 1.0 and prv
    _fake_fmnist(tmp_path, n=64)
    out = tmp_path / "dp.json"
    proc = run_script("train", "--method", "static", "--sparsity", "0.5", "--model", "mlp",
                      "--dp-noise-multiplier", "1.5", "--batch-size", "16", "--epochs", "1",
                      "--data-dir", str(tmp_path), "--json", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert (r["delta"], r["clip"], r["accountant"]) == (1e-5, 1.0, "prv")
    assert r["noise_multiplier"] == 1.5 and r["steps"] == 4 and r["epsilon"] > 0


SCRIPT = "script"  # a case also run through the installed console script (not only in-process)


@pytest.mark.parametrize(
    ("args", "message", "via"),
    [
        (["--dp-epsilon", "0"], "PrivacyError: epsilon must be a positive", SCRIPT),
        (["--dp-epsilon", "-1"], "PrivacyError: epsilon must be a positive", SCRIPT),
        (["--dp-epsilon", "3", "--dp-delta", "1"], "PrivacyError: delta must lie in (0, 1)", SCRIPT),
        (["--dp-noise-multiplier", "1", "--dp-delta", "2"], "PrivacyError: delta must lie in (0, 1)", SCRIPT),
        (["--dp-epsilon", "3", "--dp-delta", "0"], "PrivacyError: delta must lie in (0, 1)", None),
        (["--dp-epsilon", "3", "--dp-clip", "0"], "PrivacyError: the clipping norm must be a positive", SCRIPT),
        (["--dp-noise-multiplier", "0"], "PrivacyError: the noise multiplier must be a positive", None),
        (["--dp-epsilon", "3", "--dp-noise-multiplier", "1"], "PrivacyError: give exactly one", None),
        (["--dp-epsilon", "3", "--dp-accountant", "gdp"], "PrivacyError: unknown accountant 'gdp'", None),
        (["--dp-epsilon", "3", "--method", "rigl"], "PrivacyError: method 'rigl' changes the masks", SCRIPT),
        (["--dp-epsilon", "3", "--method", "snip"], "PrivacyError: method 'snip' chooses its mask", None),
        (["--dp-epsilon", "3", "--batch-size", "100"], "PrivacyError: the expected batch size", None),
        # DP flags without --dp-epsilon / --dp-noise-multiplier would be silently ignored: refused,
        # also at their default values
        (["--method", "static", "--dp-mask-is-public"],
         "DataError: --dp-mask-is-public only applies to DP-SGD: add --dp-epsilon or --dp-noise-multiplier",
         SCRIPT),
        (["--dp-clip", "1.0"],
         "DataError: --dp-clip only applies to DP-SGD: add --dp-epsilon or --dp-noise-multiplier", SCRIPT),
        (["--dp-delta", "1e-5"],
         "DataError: --dp-delta only applies to DP-SGD: add --dp-epsilon or --dp-noise-multiplier", SCRIPT),
        (["--dp-accountant", "prv"],
         "DataError: --dp-accountant only applies to DP-SGD: add --dp-epsilon or --dp-noise-multiplier", None),
        (["--dp-delta", "1e-3", "--dp-clip", "2", "--dp-accountant", "rdp", "--dp-mask-is-public"],
         "DataError: --dp-delta, --dp-clip, --dp-accountant, --dp-mask-is-public only apply to DP-SGD: "
         "add --dp-epsilon or --dp-noise-multiplier", SCRIPT),
    ],
)
def test_bad_private_settings_exit_2_with_one_line_before_the_data_is_read(tmp_path, capsys, args, message,
                                                                            via):
    from test_cli_main import run

    # no data at --data-dir: reading it would fail with a different message
    argv = ["train", "--model", "mlp", "--data-dir", str(tmp_path / "no-data"), "--no-progress",
            "--train-subset", "64", "--batch-size", "16",
            *(["--method", "static"] if "--method" not in args else []), *args]
    runs = [(run(argv), capsys.readouterr().err)]
    if via == SCRIPT:
        proc = run_script(*argv)
        runs.append((proc.returncode, proc.stderr))
    for code, err in runs:
        assert code == 2, err
        assert "Traceback" not in err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], err
