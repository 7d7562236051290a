"""sparsetorch.save / load: whole models, masks, HF rebuild, mismatches, atomic writes, size."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from tiny_models import make_tiny_llama
from torch import nn

import sparsetorch
from sparsetorch import CheckpointError, MaskSet
from sparsetorch.export import checkpoint as ckpt
from sparsetorch.export import (
    checkpoint_summary,
    load,
    load_hf,
    load_state_dict,
    read_header,
    save,
    save_hf_folder,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMATS = ["auto", "dense", "bitmask", "csr", "n:m"]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()])


def same_bits(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(bits(a[k]), bits(b[k])), k


def pruned_llama(dtype=torch.float32, pattern="2:4", sparsity=0.5):
    model = make_tiny_llama().to(dtype)
    rep = sparsetorch.prune(model, "magnitude", sparsity, pattern)
    return model, rep.masks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_model_roundtrip_bit_exact(tmp_path, fmt, dtype):
    model, masks = pruned_llama(dtype)
    path = save(model, tmp_path / "m.safetensors", format=fmt, masks=masks)
    fresh = make_tiny_llama(seed=1).to(dtype)
    loaded, lmasks = load(path, fresh)
    assert loaded is fresh
    same_bits(model.state_dict(), fresh.state_dict())
    lmasks.verify(fresh)
    assert set(lmasks.names()) == set(masks.names())
    for n in masks:
        assert torch.equal(lmasks[n], masks[n]), n
        assert str(lmasks.patterns[n]) == "2:4"


def test_unstructured_masks_and_formats_recorded(tmp_path):
    model, masks = pruned_llama(torch.float16, "unstructured", 0.7)
    path = save(model, tmp_path / "m.safetensors", masks=masks, metadata={"run": "test"})
    h = read_header(path)
    assert h["format"] == "sparsetorch-compressed" and h["format_version"] == 1
    assert h["library"] == "sparsetorch" and h["library_version"] == sparsetorch.__version__
    assert h["user_metadata"] == {"run": "test"}
    assert h["hf_config"]["model_type"] == "llama"
    t = h["tensors"]
    assert t["lm_head.weight"] == {"tied_to": "model.embed_tokens.weight"}
    assert t["model.embed_tokens.weight"]["format"] == "dense"
    assert t["model.norm.weight"]["format"] == "dense" and "pattern" not in t["model.norm.weight"]
    q = t["model.layers.0.self_attn.q_proj.weight"]
    assert q["format"] == "bitmask" and q["pattern"] == "unstructured" and q["masked"]
    assert q["shape"] == [64, 64] and q["dtype"] == "float16"
    sd, lmasks = load_state_dict(path)
    same_bits(model.state_dict(), sd)
    assert sd["lm_head.weight"] is sd["model.embed_tokens.weight"]
    for n in masks:
        assert torch.equal(lmasks[n], masks[n])


def test_save_without_masks_uses_default_targets(tmp_path):
    model, _ = pruned_llama(torch.float32, "2:4")
    path = save(model, tmp_path / "m.safetensors")
    sd, masks = load_state_dict(path)
    same_bits(model.state_dict(), sd)
    assert "model.embed_tokens.weight" not in masks and "model.layers.0.mlp.up_proj.weight" in masks
    h = read_header(path)["tensors"]["model.layers.0.mlp.up_proj.weight"]
    assert h["format"] == "n:m" and h["params"] == {"n": 2, "m": 4, "index_bits": 3}
    masks.verify(model)


def test_plain_module_and_state_dict(tmp_path):
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    sparsetorch.prune(net, "magnitude", 0.8)
    p1 = save(net, tmp_path / "a.safetensors")
    p2 = save(net.state_dict(), tmp_path / "b.safetensors")
    for p in (p1, p2):
        sd, _ = load_state_dict(p)
        same_bits(net.state_dict(), sd)
    assert "hf_config" not in read_header(p1)
    with pytest.raises(CheckpointError, match="no Hugging Face config"):
        load(p1)


def test_directory_path_gets_default_filename(tmp_path):
    net = nn.Linear(8, 8)
    path = save(net, tmp_path)
    assert path == tmp_path / ckpt.DEFAULT_FILENAME
    load(tmp_path, nn.Linear(8, 8))


def test_lazy_top_level_names(tmp_path):
    net = nn.Linear(8, 8)
    path = sparsetorch.save(net, tmp_path / "x.safetensors")
    other = nn.Linear(8, 8)
    sparsetorch.load(path, other)
    assert torch.equal(other.weight, net.weight)


def test_mismatched_model_names_the_tensor(tmp_path):
    model, masks = pruned_llama()
    path = save(model, tmp_path / "m.safetensors", masks=masks)
    bigger = make_tiny_llama(intermediate=256)
    with pytest.raises(CheckpointError, match=r"mlp\.(up|gate|down)_proj\.weight: shape"):
        load(path, bigger)
    deeper = make_tiny_llama(layers=3)
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\..*the model has this tensor"):
        load(path, deeper)
    shallower = make_tiny_llama(layers=1)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\..*does not"):
        load(path, shallower)


def test_bad_format_and_nm_errors(tmp_path):
    model, masks = pruned_llama(pattern="unstructured")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        save(model, tmp_path / "m.safetensors", format="coo")
    with pytest.raises(sparsetorch.PatternError, match="n:m"):
        save(model, tmp_path / "m.safetensors", format="n:m", masks=masks)
    assert not (tmp_path / "m.safetensors").exists()


def test_weights_outside_mask_rejected(tmp_path):
    model, masks = pruned_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.fill_(1.0)
    with pytest.raises(CheckpointError, match=r"up_proj\.weight.*apply the mask"):
        save(model, tmp_path / "m.safetensors", masks=masks)


def test_newer_version_rejected(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    net = nn.Linear(4, 4)
    path = save(net, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    h = json.loads(meta["sparsetorch"])
    h["format_version"] = 99
    save_file(tensors, str(path), metadata={"sparsetorch": json.dumps(h)})
    with pytest.raises(CheckpointError, match="format_version 99.*upgrade"):
        load_state_dict(path)


def test_atomic_write_keeps_old_file_when_interrupted(tmp_path, monkeypatch):
    model, masks = pruned_llama()
    path = save(model, tmp_path / "m.safetensors", masks=masks)
    before = path.read_bytes()
    real_write = ckpt._write

    def crash(tensors, tmp, metadata):
        real_write(tensors, tmp, metadata)
        with open(tmp, "r+b") as fh:  # half the bytes are on disk when the crash happens
            fh.truncate(os.path.getsize(tmp) // 2)
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(ckpt, "_write", crash)
    with torch.no_grad():
        model.model.norm.weight.add_(1)
    with pytest.raises(KeyboardInterrupt):
        save(model, path, masks=masks)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    load_state_dict(path)


def test_no_pickle_plain_safetensors(tmp_path):
    """The file is a plain safetensors file: any safetensors reader opens it; dense tensors keep their names."""
    from safetensors.torch import load_file

    model, masks = pruned_llama(torch.float16)
    path = save(model, tmp_path / "m.safetensors", masks=masks)
    raw = load_file(str(path))
    assert torch.equal(raw["model.norm.weight"], model.model.norm.weight)
    assert "model.layers.0.mlp.up_proj.weight::values" in raw
    assert b"pickle" not in path.read_bytes()[:16] and path.read_bytes()[8:9] == b"{"


def test_load_hf_rebuilds_and_generates_the_same(tmp_path):
    model, masks = pruned_llama()
    path = save(model, tmp_path / "m.safetensors", masks=masks)
    rebuilt, lmasks = load_hf(path)
    assert type(rebuilt).__name__ == "LlamaForCausalLM"
    same_bits(model.state_dict(), rebuilt.state_dict())
    lmasks.verify(rebuilt)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, rebuilt(ids).logits)
    again, _ = sparsetorch.load(path)  # no model: rebuilt from the stored config
    same_bits(model.state_dict(), again.state_dict())


def test_load_hf_fp16_matches_from_pretrained(tmp_path):
    """Rebuilt fp16 model == the same weights loaded by transformers (buffers such as rotary
    inv_freq keep their float32 init, logits are bit-identical)."""
    transformers = pytest.importorskip("transformers")
    model, masks = pruned_llama()
    model.save_pretrained(str(tmp_path / "hf"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float16).eval()
    path = save(ref, tmp_path / "m.safetensors", masks=masks)
    rebuilt, _ = load_hf(path)
    ref_buf, new_buf = dict(ref.named_buffers()), dict(rebuilt.named_buffers())
    assert ref_buf.keys() == new_buf.keys()
    for k in ref_buf:
        assert ref_buf[k].dtype == new_buf[k].dtype and torch.equal(ref_buf[k], new_buf[k]), k
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, rebuilt(ids).logits)


def test_save_hf_folder_reloads_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, masks = pruned_llama()
    path = save(model, tmp_path / "m.safetensors", masks=masks)
    out = save_hf_folder(path, tmp_path / "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    same_bits(model.state_dict(), reloaded.state_dict())
    MaskSet(masks.masks, masks.patterns).verify(reloaded)


def test_summary_sizes(tmp_path):
    model, masks = pruned_llama(torch.float16)
    path = save(model, tmp_path / "m.safetensors", masks=masks)
    rows = {r.name: r for r in checkpoint_summary(path)}
    up = rows["model.layers.0.mlp.up_proj.weight"]
    assert up.format == "n:m" and up.dense_bytes == 128 * 64 * 2
    groups = 128 * 64 // 4
    assert up.stored_bytes == groups * 2 * 2 + (groups * 3 + 7) // 8
    assert rows["lm_head.weight"].tied_to == "model.embed_tokens.weight"


@pytest.mark.parametrize("fmt", ["auto", "bitmask"])
def test_half_sparse_fp16_model_is_at_most_057x_dense(tmp_path, fmt):
    """Size target on a model whose weights are all targeted: <= 0.57x the dense safetensors file."""
    from safetensors.torch import save_model

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 512, bias=False), nn.Linear(512, 256, bias=False)).half()
    masks = sparsetorch.prune(net, "magnitude", 0.5).masks
    save_model(net, str(tmp_path / "dense.safetensors"))
    path = save(net, tmp_path / "sparse.safetensors", format=fmt, masks=masks)
    ratio = path.stat().st_size / (tmp_path / "dense.safetensors").stat().st_size
    assert ratio <= 0.57, ratio
    sd, _ = load_state_dict(path)
    same_bits(net.state_dict(), sd)


def test_reader_returns_numpy_dense(tmp_path):
    from sparsetorch.export import read

    model, masks = pruned_llama(torch.float16)
    path = save(model, tmp_path / "m.safetensors", masks=masks)
    arrays = read(path)
    for k, v in model.state_dict().items():
        assert isinstance(arrays[k], np.ndarray)
        assert np.array_equal(arrays[k], v.numpy())
