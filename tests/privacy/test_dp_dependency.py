"""Without opacus (the ``privacy`` extra), DP-SGD fails with a DependencyError before any data is
read or any step is trained. Runs with or without opacus installed: its absence is simulated."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsetorch.data.fashion_mnist as fashion_mnist
import sparsetorch.training.loop as loop
from sparsetorch.errors import DependencyError
from sparsetorch.privacy import dp_fit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from test_cli_errors import run_script  # noqa: E402
from test_cli_main import run  # noqa: E402
from test_recipes_data_cli import _fake_fmnist  # noqa: E402

INSTALL = "pip install 'sparsetorch[privacy]'"


@pytest.fixture
def no_opacus(monkeypatch):
    """``import opacus`` raises ImportError (None in sys.modules halts the import)."""
    monkeypatch.setitem(sys.modules, "opacus", None)


@pytest.mark.parametrize("dp", [["--dp-epsilon", "3"], ["--dp-noise-multiplier", "1"]])
def test_train_without_opacus_fails_before_reading_the_data(tmp_path, capsys, monkeypatch, no_opacus, dp):
    _fake_fmnist(tmp_path, n=64)  # readable data: only the order of the checks can stop the run
    reads = []
    real = fashion_mnist.load_fashion_mnist

    def spy(*args, **kwargs):
        reads.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(fashion_mnist, "load_fashion_mnist", spy)
    code = run(["train", "--model", "mlp", "--method", "static", "--data-dir", str(tmp_path),
                "--no-progress", "--batch-size", "16", *dp])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "DependencyError: 'opacus' is required" in lines[0] and INSTALL in lines[0], err
    assert reads == []


def test_train_console_script_without_opacus_fails_before_reading_the_data(tmp_path, monkeypatch):
    fake = tmp_path / "site"
    (fake / "opacus").mkdir(parents=True)
    (fake / "opacus" / "__init__.py").write_text("raise ImportError('simulated: opacus not installed')\n")
    monkeypatch.setenv("PYTHONPATH", str(fake))  # run_script passes os.environ on
    # no data at --data-dir: reading it first would fail with a DataError instead
    proc = run_script("train", "--model", "mlp", "--method", "static", "--no-progress",
                      "--data-dir", str(tmp_path / "no-data"), "--dp-noise-multiplier", "1")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "DependencyError" in lines[0] and INSTALL in lines[0], proc.stderr


@pytest.mark.parametrize("budget", [{"epsilon": 3.0}, {"noise_multiplier": 1.0}])
def test_dp_fit_without_opacus_fails_before_training(monkeypatch, no_opacus, budget):
    def no_training(*args, **kwargs):
        raise AssertionError("training started without the accountant")

    monkeypatch.setattr(loop, "train_epochs", no_training)
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(40, 10, generator=g), torch.randint(0, 3, (40,), generator=g))
    with pytest.raises(DependencyError, match=r"pip install 'sparsetorch\[privacy\]'"):
        dp_fit(nn.Linear(10, 3), None, data, data, batch_size=10, progress=False, **budget)
