"""Format version 3: int8 values with per-row float32 scales (``quantization``), in every layout.

Round trips (the decoded tensor is ``float32(q) * scale`` rounded to the logical dtype; the
stored positions are the float tensor's, so pruned weights load as exact +0.0 and the masks
verify), the numpy reader, the reading rules for the new fields, and the link to the decode
kernels: a loaded int8 checkpoint requantizes to exactly the stored int8 values.
"""

from __future__ import annotations

import format_spec_impl as spec
import numpy as np
import pytest
import torch

from sparsetorch.errors import CheckpointError
from sparsetorch.export import load_state_dict, read, save
from sparsetorch.export import reader as rd
from sparsetorch.export.formats import (
    dequantize_int8_rows,
    float32_to_bf16_bits,
    quantize_int8_rows,
)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 32, generator=g)
    w[torch.rand(8, 32, generator=g) < 0.5] = 0.0
    w24 = torch.randn(8, 32, generator=g)
    grp = w24.view(8, 8, 4)
    grp.scatter_(-1, grp.abs().argsort(-1)[..., :2], 0.0)
    return {"a.weight": w, "b.weight": w24, "c.weight": w.half(), "d.weight": w.bfloat16(), "norm.weight": torch.ones(8)}


TARGETS = ["a.weight", "b.weight", "c.weight", "d.weight"]


def _expected(t: torch.Tensor) -> torch.Tensor:
    """q * scale in float32, rounded to t's dtype (the decoding rule of docs/format.md)."""
    q = torch.round(t.double() / (t.double().abs().amax(1, keepdim=True) / 127)).clamp(-127, 127)
    scale = (t.double().abs().amax(1) / 127).float()
    return (q.float() * scale[:, None]).to(t.dtype)


@pytest.mark.parametrize("fmt", ["auto", "dense", "bitmask", "csr", "n:m"])
def test_int8_round_trip_keeps_pruned_zeros_and_masks(tmp_path, fmt: str) -> None:
    state = _state()
    if fmt == "n:m":  # only the 2:4 tensor fits n:m
        state = {"b.weight": state["b.weight"]}
    targets = [t for t in TARGETS if t in state]
    path = save(state, tmp_path / "q.safetensors", format=fmt, targets=targets, quantize="int8")
    ck = rd.Checkpoint(path)
    assert ck.version == 3
    for name in targets:
        info = ck.info(name)
        assert info.quantization == "int8_symmetric_per_row"
        assert ck.raw(info.parts["values"]).dtype == np.int8 and ck.raw(info.parts["scales"]).dtype == np.float32
    loaded, masks = load_state_dict(path)
    masks.verify(loaded)  # every pruned weight is exactly zero
    for name in targets:
        t = state[name]
        assert loaded[name].dtype == t.dtype
        assert torch.equal(masks[name], t != 0) or fmt == "n:m"  # n:m pads groups with fewer than 2 non-zeros
        assert (loaded[name][t == 0] == 0).all() and not torch.signbit(loaded[name][t == 0].float()).any()
        assert torch.equal(loaded[name].float(), _expected(t).float())
    if "norm.weight" in state:
        assert torch.equal(loaded["norm.weight"], state["norm.weight"])  # not targeted: not quantized
    arrays = read(path, bf16="float32")  # the numpy reader decodes the same numbers
    for name in targets:
        assert np.array_equal(arrays[name].astype(np.float32), loaded[name].float().numpy())


def test_quantized_files_are_version_3_and_the_rest_stay_version_2(tmp_path) -> None:
    state = _state()
    assert rd.Checkpoint(save(state, tmp_path / "p.safetensors", targets=TARGETS)).version == 2
    assert rd.Checkpoint(save(state, tmp_path / "q.safetensors", targets=TARGETS, quantize="int8")).version == 3
    with pytest.raises(CheckpointError, match="unknown quantize='int4'"):
        save(state, tmp_path / "x.safetensors", quantize="int4")


def test_quantization_helpers() -> None:
    a = np.array([[0.0, 0.0], [1.0, -0.5], [-2.0, 0.25]], dtype=np.float32)
    q, s = quantize_int8_rows(a, "float32")
    assert q.tolist() == [[0, 0], [127, -64], [-127, 16]] and s[0] == 1.0
    back = dequantize_int8_rows(q, s, "float32")
    assert back[0].tolist() == [0.0, 0.0] and abs(back[1, 0] - 1.0) < 1e-6
    assert float32_to_bf16_bits(np.array([1.0, -2.5, 1.00390625], np.float32)).tolist() == [0x3F80, 0xC020, 0x3F80]
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_int8_rows(np.array([[np.nan]], np.float32), "float32")
    with pytest.raises(ValueError, match="2-D float"):
        quantize_int8_rows(np.zeros(3, np.float32), "float32")


def _edit(path, edit_header=None, edit_entries=None) -> bytes:
    return spec.rewrite(path.read_bytes(), edit_entries=edit_entries, edit_header=edit_header)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: h.update(format_version=2), "quantization needs format_version >= 3"),
        (lambda h: h["tensors"]["a.weight"].update(quantization={"scheme": "int4"}), "invalid quantization"),
        (lambda h: h["tensors"]["a.weight"].update(quantization={"scheme": "int8_symmetric_per_row", "x": 1}),
         "invalid quantization"),
        (lambda h: h["tensors"]["a.weight"]["parts"].pop("scales"), "needs a 'scales' part"),
        (lambda h: h["tensors"]["a.weight"].pop("quantization"), "'scales' part belongs to quantized tensors only"),
        (lambda h: h["tensors"]["a.weight"].update(shape=[256]), "must be 2-D"),
    ],
)
def test_reader_refuses_broken_quantization_fields(tmp_path, edit, message: str) -> None:
    path = save({"a.weight": _state()["a.weight"]}, tmp_path / "q.safetensors", targets=["a.weight"], format="bitmask",
                quantize="int8")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(_edit(path, edit_header=edit))
    with pytest.raises(rd.ReadError, match=message):
        rd.read(bad)


@pytest.mark.parametrize(("value", "message"), [(0.0, "finite positive"), (-1.0, "finite positive"),
                                                (float("nan"), "finite positive")])
def test_reader_refuses_bad_scales(tmp_path, value: float, message: str) -> None:
    path = save({"a.weight": _state()["a.weight"]}, tmp_path / "q.safetensors", targets=["a.weight"], format="bitmask",
                quantize="int8")

    def edit(entries: dict) -> None:
        key = "a.weight::scales"
        code, shape, raw = entries[key]
        arr = np.frombuffer(raw, dtype="<f4").copy()
        arr[3] = value
        entries[key] = (code, shape, arr.tobytes())

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(_edit(path, edit_entries=edit))
    with pytest.raises(rd.ReadError, match=message):
        rd.read(bad)


def test_values_must_be_int8_in_a_quantized_entry(tmp_path) -> None:
    path = save({"a.weight": _state()["a.weight"]}, tmp_path / "q.safetensors", targets=["a.weight"], format="bitmask",
                quantize="int8")

    def edit(entries: dict) -> None:
        code, shape, raw = entries["a.weight::values"]
        entries["a.weight::values"] = ("U8", shape, raw)

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(_edit(path, edit_entries=edit))
    with pytest.raises(rd.ReadError, match="stored as U8, expected I8"):
        rd.read(bad)


def test_loaded_int8_checkpoint_requantizes_to_the_stored_values(tmp_path) -> None:
    """Decoding then packing for the int8 kernels gives back exactly the stored int8 values and
    scales, so an int8 checkpoint runs in the decode engine without a second rounding."""
    from sparsetorch.inference.lowbit import pack_lowbit

    state = _state(3)
    path = save(state, tmp_path / "q.safetensors", targets=TARGETS, format="bitmask", quantize="int8")
    loaded, _ = load_state_dict(path)
    ck = rd.Checkpoint(path)
    info = ck.info("a.weight")
    p = pack_lowbit(loaded["a.weight"], "bitmask", "int8")
    assert np.array_equal(p.values.numpy(), ck.raw(info.parts["values"]))
    assert np.array_equal(p.scales.numpy(), ck.raw(info.parts["scales"]))
    # the on-disk bit mask (element i = bit i % 8 of byte i // 8, C order) is the kernel's mask
    # (uint16 per 16 inputs, little-endian) when the row length is a multiple of 16
    assert np.array_equal(p.masks.numpy().view(np.uint8).reshape(-1), ck.raw(info.parts["bitmask"]))
