"""sparsetorch.save / load: whole models, masks, HF rebuild, mismatches, atomic writes, size."""

from __future__ import annotations

import hashlib
import json
import os
import struct

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
    if t.dtype == torch.bool:
        return t
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()])


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
    assert h["format"] == "sparsetorch-compressed" and h["format_version"] == 2 and h["checksum"] == "sha256"
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
    assert h["pattern"] == "2:4"  # the pattern the writer inferred and used, not "unstructured"
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
    """The file is nothing but a safetensors container: u64 header length, one JSON object, then
    byte ranges that tile the rest of the file exactly -- no pickle stream, no torch.save zip."""
    from safetensors.torch import load_file

    model, masks = pruned_llama(torch.float16)
    path = save(model, tmp_path / "m.safetensors", masks=masks)
    data = path.read_bytes()
    assert not data.startswith(b"PK\x03\x04") and not data.startswith(b"\x80")  # zip / pickle PROTO
    (n,) = struct.unpack("<Q", data[:8])
    assert (8 + n) % 8 == 0
    head = data[8 : 8 + n].decode("utf-8")
    assert head.startswith("{") and head.rstrip(" ").endswith("}")
    entries = json.loads(head)
    meta = entries.pop("__metadata__")
    assert set(meta) == {"sparsetorch", "sparsetorch.sha256"}
    spans = sorted(tuple(e["data_offsets"]) for e in entries.values())
    pos = 8 + n
    for b, e in spans:
        assert 8 + n + b == pos
        pos = 8 + n + e
    assert pos == len(data)
    raw = load_file(str(path))  # the safetensors library reads it too, with the same tensors
    assert set(raw) == set(entries)
    assert torch.equal(raw["model.norm.weight"], model.model.norm.weight)
    assert "model.layers.0.mlp.up_proj.weight::values" in raw
    ck = hashlib.sha256(meta["sparsetorch"].encode() + data[8 + n :]).hexdigest()
    assert meta["sparsetorch.sha256"] == ck


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1, bias=False)
        self.bn2 = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 4)


def test_cnn_with_batchnorm_roundtrips(tmp_path):
    """num_batches_tracked is a 0-d int64 tensor: stored with shape [] (not [1]) and read back by
    the torch loader and the numpy reader."""
    from sparsetorch.export import read

    torch.manual_seed(0)
    net = BNNet()
    net.train()
    net.bn(net.conv(torch.randn(2, 3, 8, 8)))  # running stats and num_batches_tracked = 1
    masks = sparsetorch.prune(net, "magnitude", 0.5).masks
    path = save(net, tmp_path / "bn.safetensors", masks=masks)
    assert read_header(path)["tensors"]["bn.num_batches_tracked"]["shape"] == []
    fresh = BNNet()
    load(path, fresh)
    same_bits(net.state_dict(), fresh.state_dict())
    assert fresh.bn.num_batches_tracked.shape == () and int(fresh.bn.num_batches_tracked) == 1
    arrays = read(path)
    for k, v in net.state_dict().items():
        assert arrays[k].shape == tuple(v.shape) and arrays[k].tobytes() == v.numpy().tobytes(), k


ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int16, torch.int32,
              torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.bool]


@pytest.mark.parametrize("fmt", ["auto", "dense", "bitmask", "csr"])
def test_every_dtype_and_scalars_roundtrip(tmp_path, fmt):
    """Every dtype, as a 0-d scalar, 1-D and 2-D (targeted and not), through save -> load_state_dict
    and through the numpy reader (bf16 as uint16 bits)."""
    from sparsetorch.export import read

    g = torch.Generator().manual_seed(0)
    state = {}
    for dt in ALL_DTYPES:
        base = (torch.randn(6, 8, generator=g) * 40).to(torch.int64).clamp(0, 100)
        name = str(dt).removeprefix("torch.")
        state[f"{name}.scalar"] = base[0, 0].to(dt)
        state[f"{name}.vector"] = base[0].to(dt)
        state[f"{name}.matrix"] = base.to(dt)
    targets = [k for k in state if not k.endswith(".scalar")]
    path = save(state, tmp_path / "d.safetensors", format=fmt, targets=targets)
    sd, _ = load_state_dict(path)
    arrays = read(path)
    for k, t in state.items():
        assert sd[k].dtype == t.dtype and sd[k].shape == t.shape, k
        assert torch.equal(sd[k], t), k
        ref = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
        assert arrays[k].shape == ref.shape and arrays[k].dtype == ref.dtype and arrays[k].tobytes() == ref.tobytes(), k


@pytest.mark.parametrize("sparsity", [0.0, 0.1])
@pytest.mark.parametrize("fmt", ["auto", "dense", "bitmask", "csr"])
def test_mask_with_kept_zeros_roundtrips(tmp_path, fmt, sparsity):
    """A kept weight that is exactly 0 stays kept: the dense format stores the mask too (auto picks
    dense when (almost) everything is kept)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16, bias=False))
    masks = sparsetorch.prune(net, "magnitude", sparsity).masks
    with torch.no_grad():
        net[0].weight[masks["0.weight"]] = torch.where(torch.rand(int(masks["0.weight"].sum())) < 0.3, 0.0, 1.0)
    path = save(net, tmp_path / "z.safetensors", format=fmt, masks=masks)
    if fmt == "auto" and sparsity == 0.0:
        assert read_header(path)["tensors"]["0.weight"]["format"] == "dense"
    _, lmasks = load(path, nn.Sequential(nn.Linear(16, 16, bias=False)))
    assert torch.equal(lmasks["0.weight"], masks["0.weight"])


def test_unstructured_mask_never_padded_into_nm(tmp_path):
    """With a MaskSet, n:m (which pads groups with fewer than n kept) is used only when every group
    keeps exactly n, so the loaded mask is the saved one."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 16, bias=False))
    mask = torch.zeros(16, 64, dtype=torch.bool)
    mask.view(-1, 16)[torch.arange(0, 64, 2), torch.randint(0, 16, (32,))] = True  # <= 1 per group of 16
    masks = MaskSet({"0.weight": mask}, "unstructured")
    masks.apply(net)
    path = save(net, tmp_path / "u.safetensors", masks=masks)
    entry = read_header(path)["tensors"]["0.weight"]
    assert entry["format"] != "n:m" and entry["pattern"] == "unstructured"
    _, lmasks = load_state_dict(path)
    assert torch.equal(lmasks["0.weight"], mask)
    with pytest.raises(sparsetorch.PatternError, match="exactly N"):
        save(net, tmp_path / "u2.safetensors", format="n:m", masks=masks)


def test_tied_names_keep_their_masks(tmp_path):
    model, masks = pruned_llama(pattern="unstructured")
    emb = model.model.embed_tokens.weight
    m = torch.rand(emb.shape) < 0.5
    with torch.no_grad():
        emb.mul_(m)
    both = MaskSet({**masks.masks, "model.embed_tokens.weight": m, "lm_head.weight": m},
                   {**masks.patterns, "model.embed_tokens.weight": "unstructured", "lm_head.weight": "unstructured"})
    path = save(model, tmp_path / "t.safetensors", masks=both)
    assert read_header(path)["tensors"]["lm_head.weight"] == {"tied_to": "model.embed_tokens.weight", "masked": True}
    _, lmasks = load_state_dict(path)
    assert set(lmasks.names()) == set(both.names())
    assert torch.equal(lmasks["lm_head.weight"], m)
    other = MaskSet({**both.masks, "lm_head.weight": ~m}, both.patterns)
    with pytest.raises(CheckpointError, match="tied.*masks differ"):
        save(model, tmp_path / "t2.safetensors", masks=other)


def test_save_errors_are_typed(tmp_path):
    from sparsetorch.errors import ModelError

    with torch.device("meta"):
        meta = nn.Linear(4, 4)
    with pytest.raises(ModelError, match="meta device.*to_empty"):
        save(meta, tmp_path / "m.safetensors")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match="afile is a file, not a folder"):
        save(nn.Linear(2, 2), tmp_path / "afile" / "sub" / "m.safetensors")
    with pytest.raises(ModelError, match="nn.Module or a state dict"):
        save([torch.zeros(2)], tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="not a tensor"):
        save({"a": torch.zeros(2), "b": 3}, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="complex"):
        save({"a": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "m.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_load_compares_names_and_shapes_before_decoding(tmp_path, monkeypatch):
    from sparsetorch.export import reader

    model, masks = pruned_llama()
    path = save(model, tmp_path / "m.safetensors", masks=masks)
    decoded = []
    real_get = reader.Checkpoint.get
    monkeypatch.setattr(reader.Checkpoint, "get", lambda self, name, *a, **k: decoded.append(name) or real_get(self, name, *a, **k))
    with pytest.raises(CheckpointError, match="shape"):
        load(path, make_tiny_llama(intermediate=256))
    with pytest.raises(CheckpointError, match="the model has this tensor"):
        load(path, make_tiny_llama(layers=3))
    assert decoded == []
    load(path, make_tiny_llama(seed=1))
    assert len(decoded) == len([n for n in model.state_dict() if n != "lm_head.weight"])
    with pytest.raises(sparsetorch.errors.ModelError, match="load_state_dict"):
        load(path, model.state_dict())


def test_max_bytes_limit(tmp_path):
    from sparsetorch.errors import LimitError

    model, masks = pruned_llama()
    path = save(model, tmp_path / "m.safetensors", masks=masks)
    with pytest.raises(LimitError, match="max_bytes"):
        load_state_dict(path, max_bytes=1000)
    with pytest.raises(LimitError, match="max_bytes"):
        load(path, make_tiny_llama(), max_bytes=1000)
    with pytest.raises(LimitError, match="max_bytes"):
        load_hf(path, max_bytes=1000)
    with pytest.raises(LimitError, match="max_bytes must be"):
        load_state_dict(path, max_bytes=-1)
    sd, _ = load_state_dict(path, max_bytes=10**9)
    same_bits(model.state_dict(), sd)


def _with_config(path, tmp_path, **changes):
    import format_spec_impl as spec

    def edit(h):
        h["hf_config"].update(changes)

    out = tmp_path / "edited.safetensors"
    out.write_bytes(spec.rewrite(path.read_bytes(), edit_header=edit))
    return out


@pytest.fixture
def no_real_build(monkeypatch):
    """Record every from_config that builds a model outside the meta device (real memory)."""
    transformers = pytest.importorskip("transformers")
    real = transformers.AutoModelForCausalLM.from_config
    calls = []

    def spy(*a, **k):
        if torch.get_default_device().type != "meta":
            calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", spy)
    return calls


def test_hf_config_bomb_rejected_before_allocating(tmp_path, no_real_build):
    """A config asking for a far larger model than the stored tensors (vocab 2e6 x hidden 8192 would
    be 65 GB) is compared on the meta device and refused before any real build."""
    model, masks = pruned_llama()
    path = save(model, tmp_path / "m.safetensors", masks=masks)
    bomb = _with_config(path, tmp_path, vocab_size=2_000_000, hidden_size=8192, intermediate_size=8192)
    with pytest.raises(CheckpointError, match="shape"):
        sparsetorch.load(bomb)
    deep = _with_config(path, tmp_path, num_hidden_layers=10**6)
    with pytest.raises(CheckpointError, match="layers"):
        load_hf(deep)
    assert no_real_build == []
    load_hf(path)
    assert len(no_real_build) == 1


@pytest.mark.parametrize("change", [{"hidden_size": -64}, {"intermediate_size": "128"}, {"num_attention_heads": 4.5},
                                    {"vocab_size": None, "model_type": "nonsense"}])
def test_bad_hf_config_is_a_typed_error(tmp_path, change, no_real_build):
    model, masks = pruned_llama()
    path = save(model, tmp_path / "m.safetensors", masks=masks)
    with pytest.raises(CheckpointError, match="config"):
        load_hf(_with_config(path, tmp_path, **change))
    assert no_real_build == []


def test_overwrite_false_refuses_existing_file(tmp_path):
    from sparsetorch.errors import OutputExistsError

    path = save(nn.Linear(2, 2), tmp_path / "m.safetensors")
    before = path.read_bytes()
    with pytest.raises(OutputExistsError):
        save(nn.Linear(2, 2), path, overwrite=False)
    assert path.read_bytes() == before


def test_checksum_optional(tmp_path):
    net = nn.Linear(8, 8)
    plain = save(net, tmp_path / "p.safetensors", checksum=False)
    h = read_header(plain)
    assert "checksum" not in h and h["format_version"] == 2
    sd, _ = load_state_dict(plain)
    assert torch.equal(sd["weight"], net.weight)


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


def test_save_argument_errors_are_typed(tmp_path):
    net = nn.Linear(4, 4)
    with pytest.raises(sparsetorch.TargetError, match="weight"):
        save(net, tmp_path / "m.safetensors", targets=["wieght"])
    with pytest.raises(sparsetorch.MaskError, match="MaskSet"):
        save(net, tmp_path / "m.safetensors", masks={"weight": torch.ones(4, 4, dtype=torch.bool)})
    with pytest.raises(CheckpointError, match="hf_config must be a dict"):
        save(net, tmp_path / "m.safetensors", hf_config="llama")
    with pytest.raises(CheckpointError, match="plain JSON"):
        save(net, tmp_path / "m.safetensors", hf_config={"eps": float("nan")})
    assert list(tmp_path.iterdir()) == []
