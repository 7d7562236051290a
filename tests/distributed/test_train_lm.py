"""``sparsetorch train-lm`` and ``torchrun -m sparsetorch.distributed.train``: end to end on 2
local ranks (a few steps each), and bad input through the installed console script (exit 2,
one line, no traceback, before any process starts)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli_errors import console_script, flat, run_script

from sparsetorch.distributed.train import TrainLMConfig, parse_comm, train_lm
from sparsetorch.errors import DistributedError

FIELDS = {"final_eval_loss", "bytes_sent_per_rank", "steps", "tokens", "seconds", "masks_consistent"}


def test_console_script_trains_sparseloco_with_rigl_and_writes_the_json(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    p = subprocess.run([console_script(), "train-lm", "--nproc", "2", "--comm", "sparseloco:5", "--method", "rigl",
                        "--sparsity", "0.8", "--steps", "10", "--update-every", "5", "--json", str(out)],
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    d = json.loads(out.read_text())
    assert FIELDS <= set(d) and d["steps"] == 10 and d["masks_consistent"] is True
    assert d["tokens"] == 2 * 10 * 8 * 64 and d["mask_checks"] == 1  # RigL stops updating at 75% of the steps
    assert abs(d["sparsity"] - 0.8) < 1e-3
    assert d["bytes_sent_per_rank"][0] == d["bytes_sent_per_rank"][1] > 0
    assert d["eval_loss_per_rank"][0] == d["eval_loss_per_rank"][1]  # replicas equal after the last outer step


def test_topk_sends_far_less_than_ddp_with_identical_masks() -> None:
    ddp = train_lm(TrainLMConfig(comm="ddp", method="rigl", steps=6, update_every=3))
    topk = train_lm(TrainLMConfig(comm="topk:0.01", method="rigl", steps=6, update_every=3))
    adam = train_lm(TrainLMConfig(comm="topk-adam:0.01", method="rigl", steps=6, update_every=3))
    for d in (ddp, topk, adam):
        assert d["masks_consistent"] is True and d["mask_checks"] == 1
        assert d["eval_loss_per_rank"][0] == d["eval_loss_per_rank"][1]
    # fp32 values + int32 indices at 1% vs the dense all-reduce: about 2% of the bytes
    assert topk["bytes_sent_per_rank"][0] < 0.03 * ddp["bytes_sent_per_rank"][0]
    # the Adam direction is compressed instead of the gradient: the same k, the same bytes, another run
    assert adam["bytes_sent_per_rank"] == topk["bytes_sent_per_rank"]
    assert adam["param_digest_per_rank"] != topk["param_digest_per_rank"]


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
def test_torchrun_entry_point(tmp_path: Path) -> None:
    out = tmp_path / "tr.json"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    p = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "sparsetorch.distributed.train",
                        "--comm", "diloco:2", "--method", "set", "--steps", "4", "--update-every", "2",
                        "--json", str(out)], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["masks_consistent"] is True and d["config"]["nproc"] == 2 and d["steps"] == 4
    # the JSON is not overwritten without --overwrite: every rank refuses before training
    p = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "sparsetorch.distributed.train",
                        "--steps", "2", "--json", str(out)], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert p.returncode != 0 and "OutputExistsError" in p.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--comm", "topk:0"], "top-k density must be in (0, 1]"),
    (["--comm", "topk:x"], "is not a number"),
    (["--comm", "gossip"], "use one of ddp, topk:DENSITY"),
    (["--comm", "diloco:0"], "whole number >= 1"),
    (["--nproc", "1", "--comm", "topk:0.1"], "use --nproc 2 or more"),
    (["--nproc", "0"], "--nproc must be at least 1"),
    (["--comm", "diloco:3", "--steps", "10"], "must be a multiple of H (3)"),
    (["--comm", "diloco:5", "--steps", "10", "--method", "gmp"], "masks may change only at outer steps"),
    (["--comm", "diloco:5", "--steps", "10", "--method", "rigl", "--update-every", "7"], "--update-every (7)"),
    (["--method", "rigll"], "unknown training method 'rigll'"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--outer-lr", "1.4"], "only with --comm diloco:H or sparseloco:H"),
    (["--comm", "diloco:5", "--steps", "10", "--outer-lr", "0"], "--outer-lr 0.0: a positive number"),
    (["--comm", "diloco:5", "--steps", "10", "--outer-density", "0.03"], "only with --comm sparseloco:H"),
    (["--comm", "sparseloco:5", "--steps", "10", "--outer-density", "1.5"], "a fraction in (0, 1]"),
])
def test_bad_input_exits_2_with_one_line(args, message) -> None:
    p = run_script("train-lm", *args)
    assert p.returncode == 2, (p.returncode, p.stderr[-1500:])
    assert message in flat(p.stderr) and "Traceback" not in p.stderr


def test_outer_settings_reach_the_outer_loop() -> None:
    """--outer-density sets how much of each chunk SparseLoCo sends (the bytes grow with k = 123 of
    4096 instead of 64: offsets and 2-bit values scale with k, the 4-entry tables do not), and
    --outer-lr changes the outer step (a different model at the end)."""
    base = train_lm(TrainLMConfig(comm="sparseloco:2", steps=4))
    dense = train_lm(TrainLMConfig(comm="sparseloco:2", steps=4, outer_density=0.03))
    fast = train_lm(TrainLMConfig(comm="sparseloco:2", steps=4, outer_lr=1.4))
    ratio = dense["bytes_sent_per_rank"][0] / base["bytes_sent_per_rank"][0]
    assert 1.8 < ratio < 123 / 64 + 1e-9, ratio
    assert fast["bytes_sent_per_rank"] == base["bytes_sent_per_rank"]
    assert fast["final_eval_loss"] != base["final_eval_loss"]
    assert fast["config"]["outer_lr"] == 1.4 and dense["config"]["outer_density"] == 0.03


def test_existing_json_is_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "keep.json"
    out.write_text("mine")
    p = run_script("train-lm", "--steps", "1", "--json", str(out))
    assert p.returncode == 2 and "OutputExistsError" in p.stderr
    assert out.read_text() == "mine"


def test_parse_comm() -> None:
    assert parse_comm("ddp") == ("ddp", 0.0) and parse_comm("TopK:0.01") == ("topk", 0.01)
    assert parse_comm("sparseloco:30") == ("sparseloco", 30.0)
    with pytest.raises(DistributedError):
        parse_comm("ddp:1")
    assert parse_comm("topk-adam:0.01") == ("topk-adam", 0.01)
    with pytest.raises(DistributedError, match=r"in \(0, 1\], e.g. topk-adam:0.01"):
        parse_comm("topk-adam:2")
