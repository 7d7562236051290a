"""`sparsetorch run RECIPE.yaml`: one YAML file reproduces prune -> finetune -> export.

The run must equal the same API calls made by hand (the stage runner adds nothing of its own),
keep the 2:4 pattern through fine-tuning, write a checkpoint that loads back with its masks,
and refuse every bad recipe with a typed error before any model is loaded.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest
import torch
from test_cli_errors import console_script
from test_cli_main import run

import sparsetorch.data.llm as llm
from sparsetorch.errors import SparseTorchError
from sparsetorch.stages import STAGES, plan_recipe, read_run_recipe, run_recipe

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

SEQ = 32
RECIPE = """\
model: {model}
out: {out}
seq_len: 32
eval_windows: 2
stages:
  - prune:
      method: sparsegpt
      pattern: 2:4          # unquoted: must stay the string "2:4"
      num_samples: 4
      options: {{refit: 0}}   # the reference SparseGPT: faster on the tiny model
  - finetune:
      loss: kd              # teacher defaults to 'dense': the model before pruning
      steps: 2
      batch: 2
      lr: 1e-3              # YAML 1.1 would read this as a string
      bf16: false
  - export
"""


def _recipe(tmp: Path, model: Path, out: Path, text: str = RECIPE) -> Path:
    path = tmp / "recipe.yaml"
    path.write_text(text.format(model=model, out=out))
    return path


@pytest.fixture(scope="module")
def done(hf_dir, tmp_path_factory):
    """The example-shaped recipe run once through the CLI (in-process), for several tests."""
    tmp = tmp_path_factory.mktemp("run")
    out, js = tmp / "out", tmp / "summary.json"
    recipe = _recipe(tmp, hf_dir, out)
    assert run(["run", str(recipe), "--json", str(js)]) == 0
    return {"out": out, "json": js, "recipe": recipe, "summary": json.loads(js.read_text())}


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return safetensors_torch.load_file(str(folder / "model.safetensors"))


def test_the_run_writes_one_folder_per_stage_and_a_summary(done):
    out, summary = done["out"], done["summary"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "01-prune", "02-finetune", "03-export", "recipe.yaml", "run.json"]
    assert json.loads((out / "run.json").read_text())["stages"] == summary["stages"]
    assert (out / "recipe.yaml").read_text() == done["recipe"].read_text()  # the recipe travels with its results
    assert [s["stage"] for s in summary["stages"]] == ["prune", "finetune", "export"]
    prune, ft, export = summary["stages"]
    assert prune["pattern"] == "2:4" and prune["method"] == "sparsegpt" and prune["calib_samples"] == 4
    assert summary["recipe"]["stages"][1]["finetune"]["lr"] == 1e-3 and ft["teacher"] == "dense"
    assert ft["steps"] == 2 and ft["tokens"] == 2 * 2 * SEQ
    # perplexity is carried from stage to stage: finetune starts where prune ended
    assert ft["ppl_before"] == pytest.approx(prune["ppl_after"], rel=1e-6)
    for s in summary["stages"]:
        assert s["seconds"] > 0
        assert json.loads((out / Path(s["folder"]).name / "sparsetorch.json").read_text())["stage"] == s["stage"]
    assert export["verified"] is True and export["file_bytes"] < export["dense_bytes"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporaries or locks left


def test_the_run_equals_the_same_api_calls_by_hand(done, hf_dir):
    """Same masks, same weights: the stage runner adds nothing of its own."""
    from sparsetorch import MaskSet, prune
    from sparsetorch.data.text import calibration_windows, eval_windows
    from sparsetorch.finetune import embedded_windows, finetune

    model, tok = llm.load_causal_lm(str(hf_dir), progress=False)
    dense = copy.deepcopy(model)
    report = prune(model, "sparsegpt", None, "2:4", calibration=calibration_windows(tok, 4, SEQ), tokenizer=tok,
                   num_samples=4, seq_len=SEQ, refit=0)
    pruned = {k: v.clone() for k, v in model.state_dict().items()}
    finetune(model, report.masks, embedded_windows(tok, SEQ), teacher=dense, loss="kd", steps=2, lr=1e-3,
             batch_size=2, eval_windows=eval_windows(tok, 2, SEQ), bf16=False, progress=False)

    out = done["out"]
    for stage, want in (("01-prune", pruned), ("02-finetune", model.state_dict())):
        got = _state(out / stage)
        assert set(got) <= set(want)
        for name, t in got.items():
            assert torch.equal(t, want[name]), (stage, name)
        masks = MaskSet.load(out / stage / "masks.safetensors")
        assert set(masks.masks) == set(report.masks.masks)
        assert all(torch.equal(masks.masks[n], report.masks.masks[n]) for n in masks.masks), stage
    # and it trained: fine-tuning changed the kept weights
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(_state(out / "01-prune")[name], _state(out / "02-finetune")[name])


def test_two_of_four_survives_finetuning_and_export(done):
    from sparsetorch.analysis.report import verify_folder
    from sparsetorch.export import load_hf

    out = done["out"]
    masks = verify_folder(out / "02-finetune")  # every pruned weight zero, the pattern holds
    assert {str(p) for p in masks.patterns.values()} == {"2:4"} and len(masks) == 14
    weights = _state(out / "02-finetune")
    for name in masks:
        groups = (weights[name] != 0).reshape(-1, 4).sum(dim=1)
        assert torch.equal(groups, torch.full_like(groups, 2)), name  # exactly 2 of every 4

    model, loaded = load_hf(out / "03-export")  # the compressed checkpoint loads back
    loaded.verify(model)
    assert set(loaded.masks) == set(masks.masks)
    assert all(torch.equal(loaded.masks[n], masks.masks[n]) for n in masks)
    state = model.state_dict()
    for name, t in weights.items():
        assert torch.equal(state[name], t), name  # exported at the run's dtype (auto): bit for bit


def test_yaml_reads_two_of_four_and_exponents_as_meant():
    data, _ = read_run_recipe("pattern: 2:4\nlr: 1e-4\nsteps: 10\nflag: on\nname: 1:2:3\n")
    assert data == {"pattern": "2:4", "lr": 1e-4, "steps": 10, "flag": True, "name": "1:2:3"}


def test_a_pruned_folder_can_start_with_finetune(pruned, hf_dir, tmp_path):
    """A folder with masks.safetensors needs no prune stage: its masks are loaded and kept."""
    from sparsetorch import MaskSet

    out = tmp_path / "o"
    plan = plan_recipe({"model": str(pruned), "out": str(out), "seq_len": SEQ,
                        "stages": [{"finetune": {"teacher": str(hf_dir), "steps": 1}}, "export"]})
    assert plan.stages[0].settings.teacher == str(hf_dir) and {pruned, hf_dir} <= set(plan.inputs)
    assert plan.stages[0].folder == (out / "01-finetune").absolute()
    res = run_recipe({"model": str(pruned), "out": str(out), "seq_len": SEQ, "eval_windows": 0,
                      "stages": [{"finetune": {"loss": "ce", "steps": 1, "batch": 1, "bf16": False}},
                                 {"export": {"dtype": "float16"}}, {"eval": {"windows": 1}}]},
                     progress=False)
    before = MaskSet.load(pruned / "masks.safetensors")
    after = MaskSet.load(out / "01-finetune" / "masks.safetensors")
    assert res.state.masks is not None and set(after.masks) == set(before.masks)
    assert all(torch.equal(after.masks[n], before.masks[n]) for n in before.masks)
    name = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(_state(out / "01-finetune")[name], _state(pruned)[name])  # it trained
    assert res.stages[0]["ppl_before"] is None and res.stages[1]["verified"] is True
    assert res.stages[1]["dtype"] == "float16"
    # the export wrote a float16 copy; the eval after it measured the run's float32 model, and says so
    assert (res.stages[2]["model"], res.stages[2]["dtype"]) == ("in memory", "float32")


def test_a_lora_finetune_stage_merges_into_the_same_masks(pruned, tmp_path):
    """``lora:`` in a finetune stage trains sparse LoRA adapters and writes the merged plain model:
    no adapter tensors in the folder, exactly the parent's masks, and the weights did move."""
    from sparsetorch import MaskSet

    out = tmp_path / "o"
    res = run_recipe({"model": str(pruned), "out": str(out), "seq_len": SEQ, "eval_windows": 0,
                      "stages": [{"finetune": {"loss": "ce", "steps": 2, "batch": 1, "bf16": False, "lr": 1e-2,
                                               "lora": {"r": 2, "target_modules": ["q_proj"]}}}]},
                     progress=False)
    state = _state(out / "01-finetune")
    assert not any("lora" in k for k in state)
    before, after = MaskSet.load(pruned / "masks.safetensors"), MaskSet.load(out / "01-finetune" / "masks.safetensors")
    assert all(torch.equal(after.masks[n], before.masks[n]) for n in before.masks)
    old = _state(pruned)
    q, v = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"
    assert not torch.equal(state[q], old[q]) and torch.equal(state[v], old[v])  # only the targets moved
    assert torch.equal(state[q] != 0, before.masks[q])  # every kept weight non-zero, every pruned one zero
    summary = res.stages[0]
    assert summary["settings"]["lora"] == {"r": 2, "target_modules": ["q_proj"]}
    assert 0 < summary["trainable_params"] < sum(t.numel() for t in old.values()) // 10


# ----------------------------------------------------------------------------- bad recipes
@pytest.fixture
def no_load(monkeypatch):
    """Any model load fails the test: recipe errors must come before it."""

    def load(*a, **k):
        raise AssertionError("a model was loaded before the recipe was checked")

    monkeypatch.setattr(llm, "load_causal_lm", load)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", load)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load)


def _bad(hf_dir: Path, pruned: Path, out: Path) -> list[tuple[dict, str, str]]:
    m, p = str(hf_dir), str(pruned)
    prune = {"prune": {"pattern": "2:4", "method": "magnitude"}}
    return [
        ({"model": m, "stages": ["prune"], "out": str(out), "stage": []}, "MethodError", "Did you mean: stages"),
        ({"model": m, "stages": ["prun", "export"]}, "MethodError", "unknown stage 'prun' (stage 1)"),
        ({"model": m, "stages": [{"prune": {"metod": "wanda"}}]}, "MethodError", "Did you mean: method"),
        ({"model": m, "stages": [prune, {"finetune": {"step": 3}}]}, "MethodError", "Did you mean: steps"),
        ({"model": m, "stages": [prune, {"export": {"formt": "csr"}}]}, "MethodError", "Did you mean: format"),
        ({"model": m, "stages": [{"prune": None, "export": None}]}, "MethodError", "one-key mapping"),
        ({"model": m, "stages": []}, "MethodError", "non-empty list"),
        ({"model": m, "stages": ["finetune", "prune"]}, "MethodError", "stage 1 (finetune) needs masks"),
        ({"model": m, "stages": ["eval", "export"]}, "MethodError", "stage 2 (export) needs masks"),
        ({"model": p, "stages": [{"finetune": {"teacher": "dense"}}]}, "FinetuneError", "no prune stage"),
        ({"model": p, "stages": ["finetune"]}, "FinetuneError", "needs a teacher"),
        ({"model": p, "stages": [{"finetune": {"loss": "ce", "teacher": m}}]}, "FinetuneError", "uses no teacher"),
        ({"model": m, "stages": [{"prune": {"sparsity": 1.5}}]}, "SparsityValueError", "stage 1 (prune)"),
        ({"model": m, "stages": [{"prune": {"pattern": "5:4"}}]}, "PatternError", "0 < N < M"),
        ({"model": m, "stages": [{"prune": {"method": "sparsgpt"}}]}, "MethodError", "Did you mean: sparsegpt"),
        ({"model": m, "stages": [{"prune": {"options": {"percdamp": 0}}}]}, "MethodError", "percdamp must be > 0"),
        ({"model": m, "stages": [prune, {"finetune": {"steps": 0}}]}, "FinetuneError", "steps must be a positive"),
        ({"model": m, "stages": [prune, {"finetune": {"lr": "fast"}}]}, "FinetuneError", "lr must be a finite"),
        ({"model": m, "stages": [prune, {"finetune": {"loss": "kl"}}]}, "LossError", "unknown loss term 'kl'"),
        ({"model": m, "stages": [prune, {"finetune": {"data": "/no/such.txt"}}]}, "DataError", "neither"),
        ({"model": m, "stages": [prune, {"finetune": {"teacher": "/no/such"}}]}, "ModelError", "teacher '/no/such'"),
        ({"model": m, "stages": [prune, {"finetune": {"temperature": 0}}]}, "FinetuneError", "temperature"),
        ({"model": m, "stages": [prune, {"finetune": {"lora": 0}}]}, "LoraError", "rank r must be a positive"),
        ({"model": m, "stages": [prune, {"finetune": {"lora": {"rank": 4}}}]}, "LoraError", "unknown LoRA setting"),
        ({"model": m, "stages": [prune, {"export": {"format": "zip"}}]}, "CheckpointError", "format must be"),
        ({"model": m, "stages": [prune, {"export": {"dtype": "int8"}}]}, "CheckpointError", "dtype must be"),
        ({"model": m, "seq_len": 257, "stages": ["prune"]}, "ModelError", "accepts (256 positions"),
        ({"model": m, "stages": [{"eval": {"windows": 0}}]}, "DataError", "windows must be an integer >= 1"),
        ({"model": "/no/such/model", "stages": ["prune"]}, "ModelError", "neither a built-in name"),
    ]


@pytest.fixture(scope="module")
def pruned(pruned_dir) -> Path:
    """A pruned folder (with masks.safetensors) written by `sparsetorch prune` (conftest's pruned_dir)."""
    return pruned_dir


def test_each_bad_recipe_raises_its_typed_error_before_a_model_loads(hf_dir, pruned, tmp_path, no_load):
    for i, (recipe, error, message) in enumerate(_bad(hf_dir, pruned, tmp_path / "o")):
        recipe = {"out": str(tmp_path / f"o{i}"), "seq_len": SEQ, **recipe}
        with pytest.raises(SparseTorchError) as info:
            run_recipe(recipe)
        assert type(info.value).__name__ == error and message in str(info.value), (recipe, info.value)
        assert not (tmp_path / f"o{i}").exists()  # nothing was written


def test_the_no_load_guard_bites(hf_dir, tmp_path, no_load):
    """Control: a good recipe does reach the model load, so the guard above can fail a test."""
    with pytest.raises(AssertionError, match="a model was loaded"):
        run_recipe({"model": str(hf_dir), "out": str(tmp_path / "o"), "seq_len": SEQ, "stages": ["prune"]})


def test_bad_outputs_are_refused_before_a_model_loads(hf_dir, tmp_path, no_load, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    base = {"model": str(hf_dir), "seq_len": SEQ, "stages": ["prune"]}
    cases = [
        ({**base, "out": str(full)}, "OutputExistsError", "already exists"),
        ({**base, "out": str(hf_dir)}, "OutputExistsError", "is the input"),
        ({**base, "out": str(hf_dir.parent)}, "OutputExistsError", "inside the output"),
        (base, "MethodError", "no output folder"),
    ]
    for recipe, error, message in cases:
        with pytest.raises(SparseTorchError) as info:
            run_recipe(recipe)
        assert type(info.value).__name__ == error and message in str(info.value), (recipe, info.value)
    assert (full / "notes.txt").read_text() == "mine"  # nothing was touched
    # the CLI: an existing output without --overwrite, and --json inside --out
    recipe = _recipe(tmp_path, hf_dir, full)
    assert run(["run", str(recipe)]) == 2
    assert "error: OutputExistsError: " in capsys.readouterr().err
    assert run(["run", str(recipe), "--out", str(tmp_path / "new"), "--json", str(tmp_path / "new" / "r.json")]) == 2
    assert "inside --out" in capsys.readouterr().err
    assert (full / "notes.txt").read_text() == "mine" and not (tmp_path / "new").exists()


def test_overwrite_replaces_an_earlier_run(hf_dir, tmp_path, capsys):
    text = ("model: {model}\nout: {out}\nseq_len: 32\neval_windows: 0\n"
            "stages:\n  - prune: {{method: magnitude, sparsity: 0.5}}\n  - export\n")
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, hf_dir, out, text)
    assert run(["run", str(recipe)]) == 0, capsys.readouterr().err
    lines = capsys.readouterr().out
    assert "[1/2] prune: magnitude unstructured uniform, sparsity 0.5000" in lines
    assert "[2/2] export: " in lines and "read back and verified" in lines
    (out / "notes.txt").write_text("left by hand")
    recipe.write_text(recipe.read_text().replace("sparsity: 0.5", "sparsity: 0.75"))
    assert run(["run", str(recipe)]) == 2
    assert "OutputExistsError" in capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["stages"][0]["sparsity_target"] == 0.5
    assert run(["run", str(recipe), "--overwrite"]) == 0, capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["stages"][0]["sparsity_target"] == 0.75
    assert not (out / "notes.txt").exists()  # the old run was replaced as a whole


def test_console_script_prints_the_typed_error_and_exits_2(hf_dir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {hf_dir}\nseq_len: 32\nout: {tmp_path / 'o'}\nstages:\n  - prune: {{metod: wanda}}\n")
    proc = subprocess.run([console_script(), "run", str(bad)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: MethodError: unknown key 'metod' in stage 1 (prune)"), proc.stderr
    assert "Did you mean: method?" in proc.stderr and not (tmp_path / "o").exists()


def test_registry_names_the_stages_of_the_issue():
    assert {"prune", "finetune", "export", "eval"} <= set(STAGES)
    assert STAGES["prune"].makes_masks and STAGES["finetune"].needs_masks and STAGES["export"].needs_masks
