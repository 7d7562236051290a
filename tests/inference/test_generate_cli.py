"""`sparsetorch generate DIR --prompt ...` end to end on the tiny saved Llama, and its error cases."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from test_cli_main import run  # noqa: E402

from sparsetorch.inference._decode_ext import get_decode_extension  # noqa: E402

pytestmark = pytest.mark.skipif(get_decode_extension() is None, reason="compiled decode extension unavailable")


def script(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("sparsetorch", path=str(Path(sys.executable).parent))
    assert exe, "the sparsetorch console script is not installed"
    env = {**os.environ, "COLUMNS": "80", "NO_COLOR": "1"}
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "int8"])
def test_generate_continues_the_prompt(hf_dir: Path, dtype: str, capsys) -> None:
    import torch

    assert run(["generate", str(hf_dir), "--prompt", "hello", "-n", "6", "--dtype", dtype]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("hello") and "tokens/s" in err and f"dtype {dtype}" in err
    if dtype == "fp32":  # the same text as transformers' greedy generate
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
        ids = tok("hello", return_tensors="pt").input_ids
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        assert out.rstrip("\n") == "hello" + tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)


def test_generate_with_activation_sparsity_equals_the_hooked_model(hf_dir: Path, capsys) -> None:
    """--activation-sparsity: TEAL thresholds inside the engine give the text of transformers'
    greedy generate on the model with the same thresholds installed as hooks."""
    import torch

    from sparsetorch.activation import apply_thresholds
    from sparsetorch.inference.cli import _thresholds

    assert run(["generate", str(hf_dir), "--prompt", "hello", "-n", "8", "--activation-sparsity", "0.4"]) == 0
    out, err = capsys.readouterr()
    assert "TEAL activation sparsity 0.4" in err and "thresholds calibrated" in err
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    handle = apply_thresholds(model, _thresholds(model, tok, 0.4, "teal"))
    ids = tok("hello", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    handle.remove()
    assert out.rstrip("\n") == "hello" + tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)


def test_dense_prompt_thresholds_only_the_new_tokens(hf_dir: Path, capsys) -> None:
    """--dense-prompt: the text of greedy decoding by full forwards of the model whose thresholds
    zero inputs only at positions past the prompt (by definition)."""
    import torch
    from test_decode_activation import _hooks_from

    from sparsetorch.inference.cli import _thresholds

    assert run(["generate", str(hf_dir), "--prompt", "hello there", "-n", "8", "--activation-sparsity", "0.4",
                "--dense-prompt"]) == 0
    out, err = capsys.readouterr()
    assert "prompt dense" in err
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    th = _thresholds(model, tok, 0.4, "teal")
    ids = tok("hello there", return_tensors="pt").input_ids
    start = ids.shape[1]
    hs = _hooks_from(model, th, start)
    seq = ids
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        for _ in range(8):
            nxt = model(seq).logits[0, -1].argmax().reshape(1, 1)
            seq = torch.cat([seq, nxt], dim=1)
            if eos is not None and int(nxt) in ([eos] if isinstance(eos, int) else eos):
                break
    for h in hs:
        h.remove()
    assert out.rstrip("\n") == "hello there" + tok.decode(seq[0, start:], skip_special_tokens=True)


def test_generate_samples_reproducibly(hf_dir: Path, capsys) -> None:
    args = ["generate", str(hf_dir), "--prompt", "ab", "-n", "8", "--sample", "--temperature", "2", "--seed", "3"]
    assert run(args) == 0
    first = capsys.readouterr().out
    assert run(args) == 0
    assert capsys.readouterr().out == first


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dtype", "fp8"], "unknown weight dtype 'fp8'; choose one of fp32, fp16, bf16, int8"),
        (["--head-dtype", "int4"], "unknown weight dtype 'int4'"),
        (["-n", "0"], "--max-new-tokens must be >= 1"),
        (["--sample", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--activation-sparsity", "1.5"], "activation sparsity must be in [0, 1)"),
        (["--dense-prompt"], "--dense-prompt goes with --activation-sparsity or --thresholds"),
    ],
)
def test_bad_arguments_exit_2_without_traceback(args: list[str], message: str) -> None:
    proc = script("generate", "no-such-model-dir", "--prompt", "x", *args)
    text = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2, text
    assert message in text and "Traceback" not in text


def test_missing_model_is_a_typed_error(tmp_path: Path) -> None:
    proc = script("generate", str(tmp_path / "nope"), "--prompt", "x")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "unknown model" in proc.stderr


def test_generate_from_an_int8_export_equals_int8_decoding_of_the_pruned_model(pruned_dir: Path, tmp_path: Path,
                                                                                 capsys) -> None:
    """`sparsetorch export --quantize int8` then `generate --dtype int8` on the exported folder gives the
    text of int8 decoding of the pruned model itself: the stored int8 values are packed as they are."""
    out = tmp_path / "exp"
    assert run(["export", str(pruned_dir), "--out", str(out), "--format", "bitmask", "--quantize", "int8"]) == 0
    capsys.readouterr()
    from sparsetorch.export import reader

    assert reader.Checkpoint(out / "model.sparsetorch.safetensors").version == 3
    assert run(["generate", str(out), "--prompt", "hi there", "-n", "8", "--dtype", "int8"]) == 0
    from_export = capsys.readouterr().out
    assert run(["generate", str(pruned_dir), "--prompt", "hi there", "-n", "8", "--dtype", "int8"]) == 0
    assert capsys.readouterr().out == from_export


def test_generate_with_saved_thresholds_from_the_model_and_from_an_export(pruned_dir: Path, tmp_path: Path,
                                                                           capsys) -> None:
    """--thresholds FILE: thresholds calibrated once on the float model and saved give the text
    --activation-sparsity gives (same calibration), and apply to an export read straight into the
    engine (the plain kernel keeps the stored parts as they are)."""
    from sparsetorch.inference.cli import _thresholds

    model = transformers.AutoModelForCausalLM.from_pretrained(pruned_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(pruned_dir)
    th_file = tmp_path / "th.safetensors"
    _thresholds(model, tok, 0.4, "teal").save(th_file)
    assert run(["generate", str(pruned_dir), "--prompt", "hi there", "-n", "8", "--activation-sparsity", "0.4"]) == 0
    calibrated = capsys.readouterr().out
    assert run(["generate", str(pruned_dir), "--prompt", "hi there", "-n", "8", "--thresholds", str(th_file)]) == 0
    out, err = capsys.readouterr()
    assert out == calibrated and "TEAL activation sparsity 0.4" in err and "thresholds calibrated" not in err
    exp = tmp_path / "exp"
    assert run(["export", str(pruned_dir), "--out", str(exp), "--format", "bitmask"]) == 0
    capsys.readouterr()
    assert run(["generate", str(exp), "--prompt", "hi there", "-n", "8", "--thresholds", str(th_file)]) == 0
    out, err = capsys.readouterr()
    assert out == calibrated and "weights read from the checkpoint" in err and "TEAL activation sparsity 0.4" in err
    assert run(["generate", str(exp), "--prompt", "hi there", "-n", "8"]) == 0
    assert "TEAL" not in capsys.readouterr().err  # (that the thresholds change tokens: test_from_checkpoint)
    both = script("generate", str(exp), "--prompt", "hi", "--thresholds", str(th_file), "--activation-sparsity", "0.4")
    assert both.returncode == 2 and "not both" in both.stderr and "Traceback" not in both.stderr
    bad = script("generate", str(exp), "--prompt", "hi", "--thresholds", str(tmp_path / "missing.safetensors"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_export_refuses_an_unknown_quantization(pruned_dir: Path, tmp_path: Path) -> None:
    proc = script("export", str(pruned_dir), "--out", str(tmp_path / "e"), "--quantize", "int4")
    assert proc.returncode == 2 and "--quantize must be int8" in " ".join(proc.stderr.split())


def test_generate_uses_one_thread_on_a_busy_machine(hf_dir: Path, capsys, monkeypatch) -> None:
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("SPARSETORCH_PARALLEL", "0")  # machine_busy() -> True
    try:
        torch.set_num_threads(2)
        assert run(["generate", str(hf_dir), "--prompt", "hi", "-n", "3"]) == 0
        assert "1 threads, machine busy)" in capsys.readouterr().err
        assert torch.get_num_threads() == 2  # restored afterwards
        assert run(["generate", str(hf_dir), "--prompt", "hi", "-n", "3", "--threads", "2"]) == 0
        assert "2 threads" in capsys.readouterr().err  # an explicit --threads wins
    finally:
        torch.set_num_threads(before)


def test_generate_reads_an_export_straight_into_the_engine(pruned_dir: Path, tmp_path: Path, capsys) -> None:
    """On an export folder the stored int8 parts go into the engine as they are (no float model):
    one line on stderr says how many matrices were read directly."""
    out = tmp_path / "exp"
    assert run(["export", str(pruned_dir), "--out", str(out), "--quantize", "int8"]) == 0
    capsys.readouterr()
    assert run(["generate", str(out), "--prompt", "hi there", "-n", "4", "--dtype", "int8"]) == 0
    err = capsys.readouterr().err
    assert "read straight into the int8 engine" in err and "weights read from the checkpoint" in err
    line = next(ln for ln in err.splitlines() if "read straight into" in ln)
    n_direct, total = (int(x) for x in line.split("sparsetorch: ")[1].split(" weight matrices")[0].split(" of "))
    assert n_direct >= total - 1  # every decoder matrix (the fp32 embedding becomes the int8 head: repacked)
