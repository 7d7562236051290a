"""The numpy-only reader: agrees with the torch loader and with safetensors, imports no torch."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import format_spec_impl as spec
import numpy as np
import pytest
import torch
from tiny_models import make_tiny_llama

import sparsetorch
from sparsetorch import CheckpointError
from sparsetorch.export import load_state_dict, save
from sparsetorch.export import reader as rd

EXPORT_DIR = Path(sparsetorch.__file__).parent / "export"


@pytest.fixture(scope="module", params=["float32", "float16", "bfloat16"])
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    dtype = getattr(torch, request.param)
    model = make_tiny_llama().to(dtype)
    masks = sparsetorch.prune(model, "magnitude", 0.5, "2:4").masks
    out = tmp_path_factory.mktemp(request.param)
    # a mix of formats in one file: n:m for 2:4 layers, bitmask/csr for others
    masks.masks["model.layers.1.mlp.up_proj.weight"] = torch.rand(128, 64) < 0.05
    masks.patterns["model.layers.1.mlp.up_proj.weight"] = sparsetorch.parse_pattern("unstructured")
    masks.apply(model)
    return save(model, out / "m.safetensors", masks=masks), model


def test_reader_agrees_with_torch_loader(checkpoint):
    path, model = checkpoint
    sd, _ = load_state_dict(path)
    arrays = rd.read(path)
    assert arrays.keys() == sd.keys()
    for k, t in sd.items():
        a = arrays[k]
        if t.dtype == torch.bfloat16:
            assert a.dtype == np.uint16
            assert np.array_equal(a, t.view(torch.int16).numpy().view(np.uint16)), k
        else:
            assert a.dtype == t.numpy().dtype
            assert np.array_equal(a.view(np.uint8), t.numpy().view(np.uint8)), k
    formats = {rd.Checkpoint(path).info(k).format.value for k in sd}
    assert {"dense", "n:m"} <= formats and formats & {"bitmask", "csr"}


def test_bf16_widened_to_float32(checkpoint):
    path, model = checkpoint
    wide = rd.read(path, bf16="float32")
    for k, t in model.state_dict().items():
        ref = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        assert wide[k].dtype == ref.dtype and np.array_equal(wide[k], ref), k


def test_parser_matches_safetensors(checkpoint):
    """Our container parser yields exactly what the safetensors library stores."""
    from safetensors.torch import load_file

    path, _ = checkpoint
    ck = rd.Checkpoint(path)
    official = load_file(str(path))
    for key, t in official.items():
        raw = ck.raw(key)
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        assert tuple(raw.shape) == tuple(t.shape)
        assert raw.tobytes() == t.numpy().tobytes(), key


def test_reader_imports_no_torch(checkpoint, tmp_path):
    path, model = checkpoint
    expect = {k: v.float().numpy().tolist() if v.dtype == torch.bfloat16 else v.numpy().tolist()
              for k, v in model.state_dict().items() if v.dim() == 1}
    (tmp_path / "expect.json").write_text(json.dumps(expect))
    code = f"""
import json, sys
sys.path.insert(0, {str(EXPORT_DIR)!r})
import reader
arrays = reader.read({str(path)!r}, bf16="float32")
expect = json.load(open({str(tmp_path / 'expect.json')!r}))
assert all(arrays[k].tolist() == v for k, v in expect.items())
assert "torch" not in sys.modules, "reader imported torch"
assert "sparsetorch" not in sys.modules
print(len(arrays))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.strip()) == len(model.state_dict())


def test_reader_errors_name_the_tensor(tmp_path):
    with pytest.raises(rd.ReadError, match="does not exist"):
        rd.read(tmp_path / "missing.safetensors")
    (tmp_path / "short").write_bytes(b"\x01\x02")
    with pytest.raises(rd.ReadError, match="truncated"):
        rd.read(tmp_path / "short")


def test_spec_decoder_agrees(checkpoint):
    """An independent decoder written from docs/format.md (format_spec_impl) reads the file to the
    same arrays and masks as the numpy reader and the torch loader; the checksum matches its
    definition."""
    path, model = checkpoint
    by_spec, header = spec.decode_file(path.read_bytes())
    assert header["checksum"] == "sha256"
    arrays = rd.read(path)
    sd, masks = load_state_dict(path)
    assert by_spec.keys() == arrays.keys() == sd.keys()
    for k, (a, m) in by_spec.items():
        assert a.shape == arrays[k].shape and a.tobytes() == arrays[k].tobytes(), k
        assert (m is None) == (k not in masks), k
        if m is not None:
            assert np.array_equal(m, masks[k].numpy()), k


@pytest.mark.parametrize("how", ["import sparsetorch.export.reader as reader",
                                 "from sparsetorch.export import reader"])
def test_package_reader_imports_no_torch(checkpoint, how):
    """Through the installed package (not only as a copied file): no torch, bf16 read exactly."""
    path, model = checkpoint
    code = f"""
import sys
{how}
arrays = reader.read({str(path)!r})
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
print(len(arrays), arrays["model.norm.weight"].dtype)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    n, dt = res.stdout.split()
    assert int(n) == len(model.state_dict())
    assert dt == {torch.bfloat16: "uint16", torch.float16: "float16", torch.float32: "float32"}[model.dtype]


def test_package_api_unchanged_by_lazy_imports():
    code = """
import sys
import sparsetorch
assert "torch" not in sys.modules
from sparsetorch import MaskSet, prune, save, load, CheckpointError
import sparsetorch.prune
assert callable(sparsetorch.prune) and sparsetorch.prune is prune
assert sparsetorch.MaskSet is MaskSet and sparsetorch.patterns.parse_pattern is sparsetorch.parse_pattern
from sparsetorch.export import save as s2, load as l2, load_hf, load_state_dict, checkpoint_summary, read
assert s2 is save and l2 is load
import sparsetorch.oneshot, sparsetorch.training
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


# --------------------------------------------------------------------------- container rules
def _small(tmp_path, **kw):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    sparsetorch.prune(net, "magnitude", 0.5)
    return save(net, tmp_path / "s.safetensors", **kw)


def _container(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _pack(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def _overlap(header, body):
    keys = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    a, b = keys[-2], keys[-1]  # make the last entry start inside the one before it
    n = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    start = header[a]["data_offsets"][1] - 1
    header[b]["data_offsets"] = [start, start + n]
    return header, body[: start + n]


CONTAINER_CASES = {
    "trailing bytes": lambda h, b: (h, b + b"\0" * 8),
    "overlap": _overlap,
    "gap": lambda h, b: ({k: (dict(e, data_offsets=[e["data_offsets"][0] + 8, e["data_offsets"][1] + 8])
                              if k != "__metadata__" else e) for k, e in h.items()}, b"\0" * 8 + b),
    "size mismatch": lambda h, b: ({k: (dict(e, shape=[*e["shape"], 2]) if k.endswith("::values") else e)
                                   for k, e in h.items()}, b),
}


@pytest.mark.parametrize("case", sorted(CONTAINER_CASES))
def test_invalid_containers_rejected_like_safetensors(tmp_path, case):
    """What the safetensors library refuses, the numpy reader and the torch loader refuse too."""
    from safetensors import SafetensorError, safe_open

    path = _small(tmp_path, checksum=False)
    header, body = _container(path.read_bytes())
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(_pack(*CONTAINER_CASES[case](header, body)))
    with pytest.raises(SafetensorError):
        with safe_open(str(bad), framework="pt") as f:
            [f.get_tensor(k) for k in f.keys()]  # noqa: SIM118
    with pytest.raises(rd.ReadError, match="trailing|overlaps|gap|needs"):
        rd.read(bad)
    with pytest.raises(CheckpointError):
        load_state_dict(bad)


def test_strict_json(tmp_path):
    path = _small(tmp_path, checksum=False)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    head = data[8 : 8 + n].decode()
    dup = head.replace('{"__metadata__"', '{"0.bias":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"__metadata__"', 1)
    bad = tmp_path / "dup.safetensors"
    bad.write_bytes(struct.pack("<Q", len(dup)) + dup.encode() + data[8 + n :])
    with pytest.raises(rd.ReadError, match="duplicate key"):
        rd.read(bad)


def test_single_bit_flip_in_data_is_rejected(tmp_path):
    path = _small(tmp_path)
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    for pos in (8 + n, len(data) - 1, 8 + n + (len(data) - 8 - n) // 2):
        flipped = bytearray(data)
        flipped[pos] ^= 0x10
        bad = tmp_path / "flip.safetensors"
        bad.write_bytes(bytes(flipped))
        with pytest.raises(rd.ReadError, match="checksum mismatch"):
            rd.read(bad)
        with pytest.raises(CheckpointError, match="checksum mismatch"):
            load_state_dict(bad)


def test_checksum_field_and_key_go_together(tmp_path):
    path = _small(tmp_path)
    data = path.read_bytes()

    entries, meta = spec.parse(data)
    no_key = dict(meta)
    del no_key["sparsetorch.sha256"]
    bad = tmp_path / "b.safetensors"
    bad.write_bytes(spec.build(entries, no_key))
    with pytest.raises(rd.ReadError, match="declares a checksum"):
        rd.read(bad)
    no_field = spec.rewrite(data, edit_header=lambda h: h.pop("checksum"))
    bad.write_bytes(no_field)
    with pytest.raises(rd.ReadError, match="does not declare a checksum"):
        rd.read(bad)
    v1 = spec.rewrite(data, edit_header=lambda h: h.update(format_version=1))
    bad.write_bytes(v1)
    with pytest.raises(rd.ReadError, match="unknown checksum"):
        rd.read(bad)


@pytest.mark.parametrize("version", [0, -1, True, 1.0, "2", None, 4])
def test_format_version_bounds(tmp_path, version):
    path = _small(tmp_path)
    bad = tmp_path / "v.safetensors"
    bad.write_bytes(spec.rewrite(path.read_bytes(), edit_header=lambda h: h.update(format_version=version)))
    with pytest.raises(rd.ReadError, match="format_version"):
        rd.read(bad)


def test_version_1_files_still_read(tmp_path):
    """A version-1 file (no checksum; a masked dense tensor without a mask part, whose mask is its
    non-zeros) reads as before."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False))
    masks = sparsetorch.prune(net, "magnitude", 0.0).masks  # all kept: auto stores it dense + mask
    with torch.no_grad():
        net[0].weight[0, :3] = 0.0
    path = save(net, tmp_path / "v2.safetensors", masks=masks)

    def to_v1_entries(e):
        del e["0.weight::mask"]

    def to_v1_header(h):
        h["format_version"] = 1
        h.pop("checksum")
        del h["tensors"]["0.weight"]["parts"]["mask"]

    entries, meta = spec.parse(path.read_bytes())
    to_v1_entries(entries)
    header = json.loads(meta["sparsetorch"])
    assert header["tensors"]["0.weight"]["format"] == "dense"
    to_v1_header(header)
    old = tmp_path / "v1.safetensors"
    old.write_bytes(spec.build(entries, {"sparsetorch": json.dumps(header)}))
    sd, lmasks = load_state_dict(old)
    assert torch.equal(sd["0.weight"], net[0].weight)
    assert torch.equal(lmasks["0.weight"], net[0].weight != 0)
    arr, m = rd.Checkpoint(old).get("0.weight")
    assert np.array_equal(m, net[0].weight.detach().numpy() != 0)
    header["format_version"] = 2  # the same layout claiming version 2 lacks the required mask part
    old.write_bytes(spec.build(entries, {"sparsetorch": json.dumps(header)}))
    with pytest.raises(rd.ReadError, match="needs a 'mask' part"):
        rd.read(old)


# --------------------------------------------------------------------------- size limit
def _csr_bomb(tmp_path, cols: int) -> Path:
    """A tiny, structurally valid csr file (one row, no stored values) declaring [1, cols] float32."""
    header = {"format": "sparsetorch-compressed", "format_version": 2, "tensors": {"w": {
        "format": "csr", "shape": [1, cols], "dtype": "float32", "masked": True, "pattern": "unstructured",
        "parts": {"row_ptr": "w::row_ptr", "col_idx": "w::col_idx", "values": "w::values"}}}}
    entries = {"w::row_ptr": ("U8", [2], b"\0\0"), "w::col_idx": ("U8", [0], b""), "w::values": ("F32", [0], b"")}
    path = tmp_path / "bomb.safetensors"
    path.write_bytes(spec.build(entries, {"sparsetorch": json.dumps(header)}))
    return path


def test_decoded_size_limit(tmp_path):
    """A ~300-byte file declaring 128 MiB (or 4 TiB) of zeros is refused before decoding: a
    LimitError naming max_bytes, not a MemoryError or a successful 128 MiB allocation."""
    from sparsetorch.errors import LimitError

    for cols in (1 << 25, 1 << 40):
        bomb = _csr_bomb(tmp_path, cols)
        assert bomb.stat().st_size < 1000
        with pytest.raises(rd.ReadLimitError, match="max_bytes") as exc:
            rd.read(bomb)
        assert isinstance(exc.value, LimitError) and exc.value.needed == cols * 5
        with pytest.raises(LimitError, match="max_bytes"):
            load_state_dict(bomb)
    small = _csr_bomb(tmp_path, 1000)  # 5000 decoded bytes (values + mask)
    assert rd.read(small)["w"].shape == (1, 1000)
    with pytest.raises(rd.ReadLimitError, match="max_bytes = 4999"):
        rd.read(small, max_bytes=4999)
    assert rd.read(small, max_bytes=5000)["w"].shape == (1, 1000)


@pytest.mark.parametrize("fmt", ["dense", "bitmask", "csr", "n:m"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_writer_matches_the_spec(tmp_path, fmt, dtype):
    """Every format the writer produces decodes, by the independent spec decoder, to exactly the
    saved tensors and masks (bit order, grouping, index types, kept zeros, 0-d and conv shapes)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                              torch.nn.Linear(8, 16)).to(dtype)
    masks = sparsetorch.prune(net, "magnitude", 0.5, "2:4" if fmt == "n:m" else "unstructured").masks
    if fmt == "dense":  # a kept weight that is exactly zero must stay kept
        with torch.no_grad():
            w = net[3].weight
            w[masks["3.weight"]] = torch.where(torch.arange(int(masks["3.weight"].sum())) % 3 == 0, 0.0, 1.0).to(dtype)
    path = save(net, tmp_path / "w.safetensors", format=fmt, masks=masks)
    by_spec, header = spec.decode_file(path.read_bytes())
    assert {header["tensors"][n]["format"] for n in masks} == {fmt}
    for k, t in net.state_dict().items():
        a, m = by_spec[k]
        ref = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
        assert a.shape == ref.shape and a.tobytes() == ref.tobytes(), k
        assert (m is None) == (k not in masks), k
        if m is not None:
            assert np.array_equal(m, masks[k].numpy()), k
