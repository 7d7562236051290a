"""`sparsetorch finetune` on a tiny pruned Llama folder: output, JSON, masks; bad input exits 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli_main import run
from tiny_models import make_tiny_llama, save_tiny_hf

from sparsetorch import MaskSet
from sparsetorch.analysis.report import verify_folder

transformers = pytest.importorskip("transformers")


def _args(pruned_dir, hf_dir, out, *extra):
    return ["finetune", str(pruned_dir), "--teacher", str(hf_dir), "--steps", "3", "--seq-len", "32",
            "--batch", "2", "--eval-windows", "2", "--lr", "1e-3", "--out", str(out), *extra]


def test_finetune_writes_a_verified_folder_and_json(pruned_dir, hf_dir, tmp_path, capsys):
    out, js = tmp_path / "ft", tmp_path / "ft.json"
    assert run(_args(pruned_dir, hf_dir, out, "--loss", "kd+squarehead", "--json", str(js))) == 0, \
        capsys.readouterr().err
    masks = verify_folder(out)  # every pruned weight zero, 2:4 holds
    assert {str(p) for p in masks.patterns.values()} == {"2:4"}
    before = MaskSet.load(pruned_dir / "masks.safetensors")
    assert all(torch.equal(masks.masks[n], before.masks[n]) for n in before.masks)
    res = json.loads(js.read_text())
    for key in ("ppl_before", "ppl_after", "sparsity_before", "sparsity_after", "tokens", "seconds",
                "peak_rss_mb", "loss"):
        assert res[key] is not None, key
    assert res["tokens"] == 3 * 2 * 32 and res["objective"] == "kd+squarehead" and res["steps"] == 3
    assert res["sparsity_after"] >= res["sparsity_before"] == pytest.approx(0.5)
    full = json.loads((out / "sparsetorch.json").read_text())
    assert len(full["losses"]) == 3 and len(full["lrs"]) == 3
    # the weights changed: it trained
    a = transformers.AutoModelForCausalLM.from_pretrained(pruned_dir)
    b = transformers.AutoModelForCausalLM.from_pretrained(out)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(a.state_dict()[name], b.state_dict()[name])
    assert "perplexity after 3 steps" in capsys.readouterr().out


def test_finetune_resume_from_a_checkpoint(pruned_dir, hf_dir, tmp_path):
    ck = tmp_path / "ck"
    assert run(_args(pruned_dir, hf_dir, tmp_path / "a", "--loss", "ce", "--checkpoint-dir", str(ck),
                     "--checkpoint-every", "3", "--eval-windows", "0")) == 0
    assert (ck / "last" / "state.safetensors").is_file()
    # resuming a finished run at its last step does no more steps and writes the same model
    assert run(_args(pruned_dir, hf_dir, tmp_path / "b", "--loss", "ce", "--resume", str(ck),
                     "--eval-windows", "0")) == 0
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _script() -> list[str]:
    exe = Path(sys.executable).with_name("sparsetorch")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "sparsetorch.cli"]


def _cli(argv, tmp_path):
    return subprocess.run([*_script(), *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "300"}, cwd=tmp_path)


def test_bad_input_exits_2_with_the_error_class(pruned_dir, hf_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    other_vocab = save_tiny_hf(tmp_path / "vocab64", make_tiny_llama(vocab=64))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    cases = [
        (_args(pruned_dir, hf_dir, tmp_path / "o1", "--steps", "0"), "FinetuneError", "steps must be a positive integer"),
        (_args(pruned_dir, hf_dir, tmp_path / "o2", "--lr=-1e-3"), "FinetuneError", "lr must be a finite number > 0"),
        (_args(pruned_dir, hf_dir, tmp_path / "o3", "--data", str(tmp_path / "missing.txt")), "DataError",
         "neither 'embedded', 'docs' nor an existing text file"),
        (_args(pruned_dir, hf_dir, tmp_path / "o4", "--data", str(empty)), "DataError", "is empty"),
        (["finetune", str(pruned_dir), "--out", str(tmp_path / "o5"), "--steps", "1"], "FinetuneError",
         "needs --teacher"),
        (_args(hf_dir, hf_dir, tmp_path / "o6"), "ModelError", "has no masks.safetensors"),
        (_args(pruned_dir, other_vocab, tmp_path / "o7", "--eval-windows", "0"), "FinetuneError",
         "vocabulary (64 tokens) differs"),
        (_args(pruned_dir, hf_dir, taken), "OutputExistsError", ""),
        (_args(pruned_dir, hf_dir, tmp_path / "o9", "--loss", "mse"), "LossError", "unknown loss term 'mse'"),
        (_args(pruned_dir, hf_dir, tmp_path / "o10", "--checkpoint-every", "2"), "FinetuneError",
         "--checkpoint-every needs --checkpoint-dir"),
    ]
    for argv, cls, text in cases:
        p = _cli(argv, tmp_path)
        assert p.returncode == 2, (argv, p.stderr[-2000:])
        assert f"error: {cls}: " in p.stderr and text in p.stderr, p.stderr[-2000:]
        assert "Traceback" not in p.stderr
    assert (taken / "mine.txt").read_text() == "keep me" and sorted(os.listdir(taken)) == ["mine.txt"]
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 11))


def test_soup_of_two_children(pruned_dir, hf_dir, tmp_path):
    kids = []
    for seed in ("0", "1"):
        out = tmp_path / f"kid{seed}"
        assert run(_args(pruned_dir, hf_dir, out, "--loss", "ce", "--seed", seed, "--eval-windows", "0")) == 0
        kids.append(out)
    assert run(["soup", *map(str, kids), "--out", str(tmp_path / "uni")]) == 0
    verify_folder(tmp_path / "uni")
    sds = [transformers.AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (*kids, tmp_path / "uni")]
    for k, v in sds[2].items():
        if v.is_floating_point():
            assert torch.allclose(v, (sds[0][k] + sds[1][k]) / 2, atol=1e-6), k
    js = tmp_path / "greedy.json"
    assert run(["soup", *map(str, kids), "--how", "greedy", "--seq-len", "32", "--val-windows", "2",
                "--out", str(tmp_path / "greedy"), "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert res["how"] == "greedy" and len(res["scores"]) == 2 and 1 <= len(res["used"]) <= 2
    verify_folder(tmp_path / "greedy")
    # a child of another parent (other masks) is refused, and nothing is written
    other = tmp_path / "other"
    assert run(["prune", "--model", str(hf_dir), "--sparsity", "0.5", "--seq-len", "32", "--eval-windows", "0",
                "--no-table", "--out", str(other)]) == 0
    p = _cli(["soup", str(kids[0]), str(other), "--out", str(tmp_path / "bad")], tmp_path)
    assert p.returncode == 2 and "error: SoupError: " in p.stderr and "differs from model 0's" in p.stderr
    assert not (tmp_path / "bad").exists()


def test_data_docs_without_the_docs_package_fails_before_a_model_loads(pruned_dir, hf_dir, tmp_path, monkeypatch,
                                                                      capsys):
    """--data docs when python3.11-doc is not installed: a DataError naming the package, before
    any model is loaded (not minutes later, after the student and teacher are in memory)."""
    import sparsetorch.data.llm as llm
    import sparsetorch.finetune.lm as lm

    monkeypatch.setattr(lm, "DOCS_ROOT", tmp_path / "no-docs")

    def load(*a, **k):
        raise AssertionError("a model was loaded before --data was checked")

    monkeypatch.setattr(llm, "load_causal_lm", load)
    assert run(_args(pruned_dir, hf_dir, tmp_path / "o", "--data", "docs")) == 2
    err = capsys.readouterr().err
    assert "DataError" in err and "python3.11-doc" in err and not (tmp_path / "o").exists()
