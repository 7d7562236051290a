"""`sparsetorch finetune DIR --lora R` on a tiny pruned Llama folder: the written folder is the
merged plain model with the parent's exact masks (2:4 holds), the JSON says the LoRA settings and
that the merged model was written; bad --lora values exit 2 with the error class, before any
model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli_main import run

from sparsetorch import MaskSet
from sparsetorch.analysis.report import verify_folder

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")


def _args(pruned_dir, out, *extra):
    return ["finetune", str(pruned_dir), "--loss", "ce", "--steps", "3", "--seq-len", "32", "--batch", "2",
            "--lr", "1e-2", "--bf16", "off", "--out", str(out), *extra]


def _weights(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict()


def test_lora_writes_the_merged_model_with_the_parents_masks(pruned_dir, tmp_path, capsys):
    out, js = tmp_path / "lora", tmp_path / "lora.json"
    assert run(_args(pruned_dir, out, "--lora", "4", "--lora-alpha", "4", "--eval-windows", "2",
                     "--json", str(js))) == 0, capsys.readouterr().err
    masks = verify_folder(out)  # every pruned weight zero, 2:4 holds
    parent = MaskSet.load(pruned_dir / "masks.safetensors")
    assert set(masks.masks) == set(parent.masks)
    assert all(torch.equal(masks.masks[n], parent.masks[n]) for n in parent.masks)
    assert {str(p) for p in masks.patterns.values()} == {"2:4"}
    a, b = _weights(pruned_dir), _weights(out)
    assert list(a) == list(b)  # a plain model: no adapter or mask keys in the written folder
    assert not any("lora" in f.name for f in out.iterdir())
    for n in parent.masks:
        assert not torch.equal(a[n], b[n]), n  # every pruned layer was adapted (the default targets)
        assert torch.equal(b[n] != 0, a[n] != 0), n  # ... with exactly the parent's support
    assert all(torch.equal(a[k], b[k]) for k in a if k not in parent.masks)  # the rest is untouched
    res = json.loads(js.read_text())
    assert res["lora"] == {"kind": "sparse-lora", "r": 4, "alpha": 4.0, "dropout": 0.0, "target_modules": None,
                           "merged": True, "written": "merged model (W + M * s*BA), no adapters"}
    assert res["trainable_params"] == sum(4 * (a[n].shape[0] + a[n].shape[1]) for n in parent.masks)
    assert res["steps"] == 3 and res["ppl_after"] is not None
    assert res["sparsity_after"] == pytest.approx(0.5) == res["sparsity_before"]
    assert "sparse LoRA r=4 alpha=4" in capsys.readouterr().out


def test_lora_targets_limit_what_changes(pruned_dir, tmp_path):
    out, js = tmp_path / "q", tmp_path / "q.json"
    assert run(_args(pruned_dir, out, "--lora", "2", "--lora-targets", "q_proj, v_proj", "--eval-windows", "0",
                     "--json", str(js))) == 0
    verify_folder(out)
    a, b = _weights(pruned_dir), _weights(out)
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in moved)
    assert json.loads(js.read_text())["lora"]["target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize("extra, text", [
    (["--lora", "-1"], "--lora must be a rank >= 1"),
    (["--lora", "4", "--lora-alpha", "0"], "alpha must be a finite number > 0"),
    (["--lora", "4", "--lora-dropout", "1"], "dropout must be in [0, 1)"),
    (["--lora-alpha", "8"], "need --lora R"),
    (["--lora", "4", "--lora-targets", " , "], "names no module"),
    (["--lora", "4", "--lora-targets", "q_proj,nope_proj"], "'nope_proj' matches no pruned layer"),
])
def test_bad_lora_arguments_exit_2_before_loading(pruned_dir, tmp_path, capsys, monkeypatch, extra, text):
    import sparsetorch.data.llm as llm

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(llm, "load_causal_lm", no_load)
    out = tmp_path / "bad"
    assert run(_args(pruned_dir, out, *extra)) == 2
    err = capsys.readouterr().err
    assert "error: LoraError: " in err and text in " ".join(err.split()), err
    assert not out.exists()


def test_bad_lora_through_the_console_script(pruned_dir, tmp_path):
    exe = Path(sys.executable).with_name("sparsetorch")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "sparsetorch.cli"]
    p = subprocess.run([*cmd, *_args(pruned_dir, tmp_path / "o", "--lora", "-3")], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "COLUMNS": "300"}, cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "error: LoraError: --lora must be a rank >= 1" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("extra", "lr"), [(["--lora", "2"], 1e-3), ([], 1e-4), (["--lora", "2", "--lr", "5e-3"], 5e-3)])
def test_default_lr_is_larger_for_lora(pruned_dir, tmp_path, capsys, extra, lr):
    # adapters start at zero and need larger steps: without --lr, LoRA trains at 1e-3, full fine-tuning at 1e-4
    args = ["finetune", str(pruned_dir), "--loss", "ce", "--steps", "2", "--seq-len", "32", "--batch", "2",
            "--bf16", "off", "--out", str(tmp_path / "o"), "--eval-windows", "0", "--json", str(tmp_path / "o.json"),
            *extra]
    assert run(args) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "o.json").read_text())["lr"] == lr
