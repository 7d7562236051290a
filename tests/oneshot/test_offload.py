"""Streamed pruning from a safetensors folder (one block in memory at a time)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_llama

import sparsetorch
from sparsetorch.errors import CheckpointError, MethodError, OutputExistsError, PatternError

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from sparsetorch.oneshot import offload, pipeline  # noqa: E402
from sparsetorch.oneshot.offload import prune_pretrained  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _calib():
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture()
def src(tmp_path):
    make_tiny_llama(layers=3, seed=3).save_pretrained(tmp_path / "src")
    return tmp_path / "src"


@pytest.mark.parametrize(
    ("method", "pattern", "kw"),
    [("sparsegpt", "unstructured", {}), ("wanda", "2:4", {"reconstruct": True, "reconstruct_steps": 2})],
)
def test_streamed_result_equals_in_memory_pruning_bit_exactly(src, tmp_path, method, pattern, kw):
    ref = make_tiny_llama(layers=3, seed=3)
    sp = 0.5 if pattern == "unstructured" else None
    r1 = sparsetorch.prune(ref, method, sp, pattern, calibration=_calib(), progress=False, **kw)
    r2 = prune_pretrained(
        src, tmp_path / "out", method, sp, pattern, calibration=_calib(), progress=False, **kw
    )
    out = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    a, b = ref.state_dict(), out.state_dict()
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert out.lm_head.weight is out.model.embed_tokens.weight
    assert r2.sparsity_actual == pytest.approx(r1.sparsity_actual)
    r2.masks.verify(out)


def test_only_the_current_block_has_weights_in_memory(src, tmp_path, monkeypatch):
    seen = {}
    real_find, real_out = offload.find_decoder_blocks, pipeline.output_pass

    def find(model):
        name, blocks = real_find(model)
        seen["blocks"] = blocks
        return name, blocks

    checked = []

    def out_pass(block, inputs):
        for other in seen["blocks"]:
            on_meta = all(p.is_meta for p in other.parameters())
            assert on_meta == (other is not block)
        checked.append(block)
        return real_out(block, inputs)

    monkeypatch.setattr(offload, "find_decoder_blocks", find)
    monkeypatch.setattr(pipeline, "output_pass", out_pass)
    prune_pretrained(src, tmp_path / "out", "wanda", 0.5, calibration=_calib(), progress=False)
    assert len(checked) == 3


def test_bad_inputs_raise_and_leave_no_output(src, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="config.json"):
        prune_pretrained(tmp_path, out, calibration=_calib())
    with pytest.raises(OutputExistsError, match="is the input"):
        prune_pretrained(src, src, calibration=_calib(), overwrite=True)
    with pytest.raises(PatternError):  # 64 input features do not split into groups of 5
        prune_pretrained(src, out, "wanda", None, "2:5", calibration=_calib(), progress=False)
    with pytest.raises(MethodError, match="uniform"):
        prune_pretrained(src, out, "wanda", 0.5, allocation="owl", calibration=_calib(), progress=False)
    with pytest.raises(MethodError):
        prune_pretrained(src, out, "wanda", 0.5, calibration=_calib(), progress=False, bogus=1)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temporary folder left behind
    (src / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        prune_pretrained(src, out, calibration=_calib())


def test_existing_output_is_refused_before_any_work_and_never_deleted(src, tmp_path, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("the output check must come before pruning")

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # someone else's model folder
    (out / "keep.txt").write_text("mine")
    monkeypatch.setattr(offload, "_tensor_index", no_work)
    with pytest.raises(OutputExistsError, match="did not write"):
        prune_pretrained(src, out, "wanda", 0.5, calibration=_calib(), progress=False)
    for bad in (src / "pruned", tmp_path):  # inside the input / containing the input
        with pytest.raises(OutputExistsError, match="inside"):
            prune_pretrained(src, bad, "wanda", 0.5, calibration=_calib(), progress=False, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine" and (out / "config.json").read_text() == "{}"
    assert sorted(p.name for p in src.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    monkeypatch.undo()
    prune_pretrained(src, out, "wanda", 0.5, calibration=_calib(), progress=False, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3
