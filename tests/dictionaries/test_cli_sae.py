"""``sparsetorch sae harvest | train | eval`` end to end on a tiny model, and their bad input."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli_errors import flat, run_script
from test_cli_main import run

from sparsetorch.dictionaries import ActivationStore, SparseAutoencoder


def test_train_then_eval(hf_dir, tmp_path):
    out = tmp_path / "sae"
    assert run(["sae", "train", "--model", str(hf_dir), "--site", "resid:1", "--tokens", "3000", "--seq-len",
                "64", "--kind", "topk", "--k", "4", "--width", "96", "--batch-size", "256", "--out", str(out)]) == 0
    sae = SparseAutoencoder.load(out)
    assert sae.cfg.site == "resid:1" and sae.cfg.model == str(hf_dir) and sae.cfg.width == 96
    acts = ActivationStore(str(out) + ".activations")
    assert acts.rows >= 3000 and acts.d == 64
    js = tmp_path / "m.json"
    assert run(["sae", "eval", str(out), "--seq-len", "64", "--eval-windows", "4", "--lm-windows", "2",
                "--json", str(js)]) == 0
    m = json.loads(js.read_text())
    for key in ("l0", "fvu", "dead_fraction", "delta_lm_loss", "ce_recovered", "tokens"):
        assert key in m
    assert m["l0"] == pytest.approx(4.0) and m["tokens"] == 4 * 63
    # a second train on the same activations reuses them (no harvest), into a new folder
    assert run(["sae", "train", "--activations", str(acts.folder), "--kind", "batchtopk", "--k", "4",
                "--width", "96", "--batch-size", "256", "--out", str(tmp_path / "bt")]) == 0
    assert SparseAutoencoder.load(tmp_path / "bt").threshold.isfinite()


@pytest.mark.parametrize(("args", "message"), [
    (["sae", "train", "--site", "resid:1", "--tokens", "100", "--k", "64", "--width", "64", "--out", "X"],
     "k must be in 1..width-1"),
    (["sae", "train", "--site", "resid:1", "--tokens", "100", "--kind", "relu", "--out", "X"], "unknown"),
    (["sae", "train", "--out", "X"], "pass --site"),
    (["sae", "harvest", "--site", "resid:99", "--tokens", "100", "--out", "X"], "valid sites"),
    (["sae", "harvest", "--site", "resid", "--tokens", "100", "--out", "X"], "KIND:LAYER"),
    (["sae", "eval", "NOPE"], "not a saved SAE"),
])
def test_bad_input_exits_2_without_traceback(hf_dir, tmp_path, args, message):
    args = [a.replace("X", str(tmp_path / "o")) for a in args]
    if args[1] == "harvest":
        args += ["--model", str(hf_dir), "--seq-len", "32"]
    p = run_script(*args)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert message in flat(p.stderr + p.stdout)


def test_truncated_shard_via_cli(hf_dir, tmp_path):
    acts = tmp_path / "acts"
    assert run(["sae", "harvest", "--model", str(hf_dir), "--site", "mlp:0", "--tokens", "2000", "--seq-len", "64",
                "--out", str(acts)]) == 0
    shard = acts / "shard_00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:200])
    p = run_script("sae", "train", "--activations", str(acts), "--k", "4", "--width", "32", "--batch-size", "64",
                   "--out", str(tmp_path / "s"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "truncated" in flat(p.stderr + p.stdout)
    assert run(["sae", "harvest", "--model", str(hf_dir), "--site", "mlp:0", "--tokens", "2000", "--seq-len", "64",
                "--out", str(acts), "--resume"]) == 0
    assert run(["sae", "train", "--activations", str(acts), "--k", "4", "--width", "32", "--batch-size", "64",
                "--out", str(tmp_path / "s")]) == 0


def test_resume_with_a_larger_budget_extends_the_harvest(hf_dir, tmp_path):
    acts = tmp_path / "acts"
    base = ["sae", "harvest", "--model", str(hf_dir), "--site", "mlp:0", "--seq-len", "64", "--out", str(acts)]
    assert run([*base, "--tokens", "2000"]) == 0
    small = ActivationStore(acts)
    old_windows, old_first = small.windows(), small.shard(0)["acts"]
    assert run([*base, "--tokens", "5000", "--resume"]) == 0
    big = ActivationStore(acts)
    assert big.manifest.rows >= 5000 and big.manifest.n_windows > small.manifest.n_windows
    w = big.windows()
    assert torch.equal(w[:len(old_windows)], old_windows)  # the harvested windows stay first
    assert len({tuple(x.tolist()) for x in w}) == len(w)  # and no window is harvested twice
    # the old budget's only shard was cut short: harvested again, the same rows first
    assert len(small.manifest.shards) == 1 and big.shard(0)["acts"].shape[0] > old_first.shape[0]
    assert torch.allclose(big.shard(0)["acts"][:len(old_first)], old_first, atol=1e-3)


def test_interrupted_training_resumes_via_cli(hf_dir, tmp_path, monkeypatch):
    acts = tmp_path / "acts"
    assert run(["sae", "harvest", "--model", str(hf_dir), "--site", "resid:1", "--tokens", "4000", "--seq-len", "64",
                "--out", str(acts)]) == 0
    common = ["sae", "train", "--activations", str(acts), "--k", "4", "--width", "96", "--batch-size", "256"]
    assert run([*common, "--out", str(tmp_path / "whole")]) == 0
    real = ActivationStore.batches

    def crash_after_9(self, *a, **kw):
        for i, x in enumerate(real(self, *a, **kw)):
            if i == 9:
                raise KeyboardInterrupt
            yield x

    out = tmp_path / "part"
    state = tmp_path / "part.train-state.safetensors"
    monkeypatch.setattr(ActivationStore, "batches", crash_after_9)
    assert run([*common, "--checkpoint-every", "4", "--out", str(out)]) != 0  # the CLI reports the interrupt
    monkeypatch.setattr(ActivationStore, "batches", real)
    assert state.is_file() and not out.exists()
    # starting again without --resume would throw the state away: refused
    p = run_script(*common, "--checkpoint-every", "4", "--out", str(out))
    assert p.returncode == 2 and "--resume" in flat(p.stderr + p.stdout) and "Traceback" not in p.stderr
    assert run([*common, "--checkpoint-every", "4", "--resume", "--out", str(out)]) == 0
    assert not state.exists()  # finished: the state file is removed
    a, b = SparseAutoencoder.load(tmp_path / "whole"), SparseAutoencoder.load(out)
    for name, t in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], t, rtol=0, atol=0, equal_nan=True, msg=name)
    p = run_script(*common, "--resume", "--out", str(tmp_path / "none"))
    assert p.returncode == 2 and "no training state" in flat(p.stderr + p.stdout)
