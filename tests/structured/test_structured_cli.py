"""``sparsetorch prune-structured``: a smaller folder that plain transformers loads, its plan,
all-True masks for ``sparsetorch finetune``, and argument errors before any model load (exit 2,
through the installed console script)."""

from __future__ import annotations

import json

import pytest
from test_cli_errors import run_script
from test_cli_main import run

import sparsetorch.data.llm as llm

transformers = pytest.importorskip("transformers")


def test_prune_structured_writes_a_loadable_smaller_model_and_its_plan(hf_dir, tmp_path) -> None:
    out, js = tmp_path / "s30", tmp_path / "s30.json"
    assert run(["prune-structured", "--model", str(hf_dir), "--remove", "0.3", "--what", "heads,channels",
                "--allocation", "uniform", "--seq-len", "32", "--calib-samples", "4", "--eval-windows", "2",
                "--out", str(out), "--json", str(js)]) == 0
    s = json.loads(js.read_text())
    assert s["params_after"] < s["params_before"] and s["ppl_dense"] > 0 and s["ppl_pruned"] > 0
    assert s["compensated"] and s["score"] == "flap"
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert back.config.intermediate_size == s["config"]["intermediate_size"] < 128
    assert back.config.num_attention_heads == s["config"]["num_attention_heads"]
    assert back.config.num_key_value_heads == s["config"]["num_key_value_heads"]
    # heads really went (4 query / 2 KV heads before), GQA-consistent, and the summary counts them
    heads, kv = back.config.num_attention_heads, back.config.num_key_value_heads
    assert heads < 4 and heads % kv == 0
    assert s["removed"]["heads_per_layer"] == 4 - heads and s["removed"]["kv_heads_per_layer"] == 2 - kv
    assert s["removed"]["channels_per_layer"] == 128 - back.config.intermediate_size
    assert all(blk.self_attn.q_proj.out_features == heads * back.config.head_dim for blk in back.model.layers)
    assert sum(p.numel() for p in back.model.layers.parameters()) == s["params_after"]
    plan = json.loads((out / "structured_plan.json").read_text())["plan"]
    assert len(plan["layers"]) == 2 and len(plan["layers"][0]["channels_removed"]) == 128 - s["config"]["intermediate_size"]
    for entry in plan["layers"]:  # every removed structure has its score, at or below the layer's cut-off
        assert len(entry["head_scores"]) == len(entry["heads_removed"]) == 4 - heads
        assert len(entry["kv_head_scores"]) == len(entry["kv_heads_removed"]) == 2 - kv
        assert len(entry["channel_scores"]) == len(entry["channels_removed"])
        assert max(entry["channel_scores"]) <= entry["channel_cutoff"]
    from sparsetorch.analysis.report import MASKS_FILE
    from sparsetorch.masks import MaskSet

    masks = MaskSet.load(out / MASKS_FILE)
    assert masks.sparsity().overall == 0.0 and "model.layers.0.mlp.down_proj.weight" in masks.masks
    # the folder is a valid start for recovery fine-tuning
    ft = tmp_path / "ft"
    assert run(["finetune", str(out), "--out", str(ft), "--loss", "ce", "--steps", "1", "--seq-len", "32",
                "--batch", "1", "--eval-windows", "0"]) == 0
    assert transformers.AutoModelForCausalLM.from_pretrained(ft).config.intermediate_size == s["config"]["intermediate_size"]
    # the original folder is untouched
    assert transformers.AutoConfig.from_pretrained(hf_dir).intermediate_size == 128


@pytest.fixture
def no_load(monkeypatch):
    def load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(llm, "load_causal_lm", load)


@pytest.mark.parametrize(("args", "message"), [
    (["--remove", "0"], "AllocationError: remove must be a fraction"),
    (["--remove", "1.5"], "AllocationError: remove must be a fraction"),
    (["--remove", "0.2", "--score", "flapp"], "Did you mean: flap"),
    (["--remove", "0.2", "--what", "rows"], "MethodError: unknown structure 'rows'"),
    (["--remove", "0.2", "--allocation", "owl"], "AllocationError: unknown allocation"),
    (["--remove", "0.2", "--block-share", "0"], "block_share must be in"),
    (["--remove", "0.2", "--seq-len", "257"], "accepts (256 positions"),
])
def test_bad_arguments_fail_before_the_model_is_loaded(hf_dir, no_load, capsys, args, message) -> None:
    code = run(["prune-structured", "--model", str(hf_dir), "--eval-windows", "0", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


def test_an_existing_output_is_refused_before_loading(hf_dir, no_load, tmp_path, capsys) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    code = run(["prune-structured", "--model", str(hf_dir), "--remove", "0.2", "--seq-len", "32",
                "--out", str(tmp_path / "taken")])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_the_console_script_exits_2_on_bad_input_without_a_traceback(hf_dir) -> None:
    proc = run_script("prune-structured", "--model", str(hf_dir), "--remove", "2")
    assert proc.returncode == 2 and "AllocationError" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_script("prune-structured", "--model", str(hf_dir), "--remove", "0.5", "--what", "heads",
                      "--score", "magnitude", "--eval-windows", "0", "--seq-len", "32")
    assert proc.returncode == 2 and "more heads than exist" in proc.stderr and "Traceback" not in proc.stderr


def test_a_model_that_cannot_be_mapped_is_a_clear_error(tmp_path) -> None:
    from tiny_models import byte_tokenizer

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=256,
                                                                n_positions=64))
    gpt2.save_pretrained(tmp_path / "g")
    byte_tokenizer().save_pretrained(tmp_path / "g")
    proc = run_script("prune-structured", "--model", str(tmp_path / "g"), "--remove", "0.2", "--eval-windows", "0",
                      "--seq-len", "32", "--calib-samples", "2")
    assert proc.returncode == 2 and "ModelError" in proc.stderr and "intermediate_size" in proc.stderr


def test_compensation_a_model_class_would_drop_is_refused_and_no_compensate_works(tmp_path, capsys) -> None:
    from tiny_models import byte_tokenizer

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))
    qwen.save_pretrained(tmp_path / "q")
    byte_tokenizer().save_pretrained(tmp_path / "q")
    args = ["prune-structured", "--model", str(tmp_path / "q"), "--remove", "0.3", "--what", "heads,channels",
            "--allocation", "uniform", "--eval-windows", "0", "--seq-len", "32", "--calib-samples", "2"]
    code = run([*args, "--out", str(tmp_path / "refused")])
    err = capsys.readouterr().err
    assert code == 2 and "ModelError" in err and "Qwen2ForCausalLM" in err and "--no-compensate" in err, err
    assert "Traceback" not in err and not (tmp_path / "refused").exists()
    assert run([*args, "--no-compensate", "--out", str(tmp_path / "s"), "--json", str(tmp_path / "s.json")]) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert not s["compensated"] and s["removed"]["heads_per_layer"] > 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert back.config.num_attention_heads == 4 - s["removed"]["heads_per_layer"]
