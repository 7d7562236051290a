"""Checkpoint and resume of a distributed sparse run (2 gloo ranks).

A run stopped after a checkpoint and resumed must end bit-identical to the uninterrupted run
(weights, masks, optimizer, error feedback, byte counts), for top-k with RigL and for DiLoCo;
a rank killed mid-run under ``torchrun --max-restarts 1`` is restarted, the run continues from
the last committed checkpoint and ends exactly as the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from sparsetorch.distributed.train import FAULT_ENV, TrainLMConfig, check_config, train_lm
from sparsetorch.errors import DistributedError

BASE = TrainLMConfig(method="rigl", sparsity=0.8, steps=8, update_every=2)


@pytest.mark.parametrize("comm", ["topk:0.05", "topk-adam:0.05", "diloco:2"])
def test_stop_and_resume_equals_the_uninterrupted_run(tmp_path: Path, monkeypatch, comm: str) -> None:
    full = train_lm(replace(BASE, comm=comm))
    ck = str(tmp_path / "ck")
    cfg = replace(BASE, comm=comm, checkpoint_every=4, checkpoint_dir=ck, resume=True)
    monkeypatch.setenv(FAULT_ENV, "1:6")  # rank 1 dies after step 6; the last checkpoint is step 4
    with pytest.raises(DistributedError, match="rank 1 exited with code 3"):
        train_lm(cfg)
    monkeypatch.delenv(FAULT_ENV)
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step-00000004"
    assert sorted(p.name for p in (tmp_path / "ck" / "step-00000004").iterdir()) == [
        "manifest.json", "rank-0.safetensors", "rank-1.safetensors"]
    rest = train_lm(cfg)
    assert rest["param_digest_per_rank"] == full["param_digest_per_rank"]
    assert rest["bytes_sent_per_rank"] == full["bytes_sent_per_rank"]
    assert rest["tokens"] == full["tokens"] and rest["mask_checks"] == full["mask_checks"]
    assert rest["final_eval_loss"] == full["final_eval_loss"]
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step-00000008"


def test_checkpoint_settings_are_checked(tmp_path: Path) -> None:
    ck = str(tmp_path / "ck")
    with pytest.raises(DistributedError, match="need --checkpoint-dir"):
        check_config(replace(BASE, checkpoint_every=2))
    with pytest.raises(DistributedError, match="powersgd are not supported"):
        check_config(replace(BASE, comm="powersgd:2", checkpoint_every=2, checkpoint_dir=ck))
    with pytest.raises(DistributedError, match="multiple of H"):
        check_config(replace(BASE, comm="diloco:4", checkpoint_every=6, checkpoint_dir=ck, update_every=4))
    train_lm(replace(BASE, comm="ddp", steps=2, checkpoint_every=2, checkpoint_dir=ck))
    with pytest.raises(DistributedError, match="already holds a checkpoint: pass --resume"):
        check_config(replace(BASE, checkpoint_dir=ck))
    with pytest.raises(DistributedError, match="other settings: lr 0.001 there, 0.002 now"):
        check_config(replace(BASE, comm="ddp", steps=2, lr=2e-3, checkpoint_dir=ck, resume=True))
    with pytest.raises(DistributedError, match="written by 2 ranks; this run has 3"):
        check_config(replace(BASE, comm="ddp", steps=2, nproc=3, checkpoint_dir=ck, resume=True))


def test_a_killed_rank_is_restarted_by_torchrun_and_the_run_ends_as_if_never_interrupted(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("no torchrun")
    args = ["--comm", "topk:0.05", "--method", "rigl", "--sparsity", "0.8", "--steps", "8", "--update-every", "2"]

    def launch(out: Path, extra: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
                               "-m", "sparsetorch.distributed.train", *args, *extra, "--json", str(out)],
                              capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)

    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    p = launch(tmp_path / "clean.json", [], env)
    assert p.returncode == 0, p.stderr[-2000:]
    ck = tmp_path / "ck"
    p = launch(tmp_path / "crashed.json", ["--checkpoint-every", "4", "--checkpoint-dir", str(ck), "--resume",
                                           "--pg-init-dir", str(tmp_path / "pg")], {**env, FAULT_ENV: "1:6"})
    assert p.returncode == 0, p.stderr[-3000:]
    clean = json.loads((tmp_path / "clean.json").read_text())
    crashed = json.loads((tmp_path / "crashed.json").read_text())
    # the planted crash happened and the agent restarted the group (which rank the agent saw fail
    # first is a race: rank 0 may die of the lost peer before rank 1's exit is reported)
    assert "IndexError" not in p.stderr  # a failed all_gather raises its own error, not garbage indices
    assert "failed (exitcode:" in p.stderr and (clean["restarts"], crashed["restarts"]) == (0, 1)
    assert crashed["param_digest_per_rank"] == clean["param_digest_per_rank"]
    assert crashed["bytes_sent_per_rank"] == clean["bytes_sent_per_rank"]
    assert crashed["final_eval_loss"] == clean["final_eval_loss"]
