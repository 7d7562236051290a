"""The numpy-only reader: agrees with the torch loader and with safetensors, imports no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import make_tiny_llama

import sparsetorch
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
