"""`sparsetorch plan` and `sparsetorch bench inference` end to end on a tiny saved Llama."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from test_cli_main import run  # noqa: E402 - the one in-process CLI runner (exit code)

# the tiny Llama: 2 blocks of q/k/v/o (64x64, 32x64, 32x64, 64x64) and gate/up/down (128x64, 128x64,
# 64x128), and a 256x64 LM head tied to the embedding
SHAPES = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
          "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
          "mlp.down_proj": (64, 128)}
LINEARS = {f"model.layers.{i}.{k}": v for i in range(2) for k, v in SHAPES.items()}


def test_plan_measures_every_linear_of_the_pruned_model(hf_dir: Path, tmp_path: Path, capsys) -> None:
    js = tmp_path / "plan.json"
    assert run(["plan", str(hf_dir), "--prune", "0.5", "--json", str(js)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    plan = json.loads(js.read_text())
    assert plan["batch_size"] == 1 and isinstance(plan["verdict"], str) and plan["verdict"] in out
    layers = {c["name"]: c for c in plan["layers"]}
    assert set(layers) == {*LINEARS, "lm_head"}
    for name, shape in LINEARS.items():
        c = layers[name]
        assert tuple(c["shape"]) == shape and c["sparsity"] == 0.5, name
        assert c["nbytes"]["dense"] == 4 * math.prod(shape)  # fp32
        assert c["kernel"] in c["times_s"] and all(t > 0 for t in c["times_s"].values())
    assert layers["lm_head"]["sparsity"] == 0.0  # the LM head is not pruned
    pruned = sum(math.prod(s) for s in LINEARS.values())
    assert plan["model_sparsity"] == pytest.approx(0.5 * pruned / (pruned + 256 * 64))
    assert plan["model_bytes"] >= plan["sparse_bytes"] > 0  # (which kernels win depends on timings)


def test_bench_inference_decodes_dense_and_sparse(hf_dir: Path, tmp_path: Path, capsys) -> None:
    js = tmp_path / "bench.json"
    argv = ["bench", "inference", "--model", str(hf_dir), "--prune", "0.5", "--tokens", "2", "--json", str(js)]
    assert run(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    res = json.loads(js.read_text())
    assert res["prune"] == 0.5 and res["tokens"] == 2
    assert res["dense_tokens_per_s"] > 0 and res["sparse_tokens_per_s"] > 0
    assert {c["name"] for c in res["sparsify"]["layers"]} == {*LINEARS, "lm_head"}
    assert "tokens/s" in out and "dense" in out and "sparse" in out
    # the --json file is not replaced without --overwrite (checked before the model is loaded)
    assert run(argv) == 2
    assert "OutputExistsError" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["plan", "{dir}", "--batch", "0"], "DataError"),
        (["plan", "{dir}", "--prune", "1.5"], "SparsityValueError"),
        (["plan", "{dir}", "--min-sparsity", "-1"], "SparsityValueError"),
        (["bench", "inference", "--model", "{dir}", "--tokens", "0"], "DataError"),
        (["bench", "inference", "--model", "{dir}", "--json", "{tmp}"], "OutputExistsError"),  # a folder
    ],
)
def test_bad_arguments_are_typed_errors_before_loading(hf_dir, tmp_path, monkeypatch, capsys, argv, error) -> None:
    import sparsetorch.data.llm as llm

    def load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(llm, "load_causal_lm", load)
    argv = [a.format(dir=hf_dir, tmp=tmp_path) for a in argv]
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {error}: " in err and "Traceback" not in err
