"""MaskSet.verify trusts the stored mask; MaskSet.load rejects malformed metadata with a typed error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sparsetorch import MaskSet
from sparsetorch.errors import CheckpointError, MaskError


def _model(weight: torch.Tensor) -> nn.Module:
    m = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        m.weight.copy_(weight)
    return m


@pytest.mark.parametrize("pattern", ["channel", "block2x2", "2:4", "unstructured"])
def test_verify_accepts_exact_zero_inside_a_kept_structure(pattern: str) -> None:
    # rows 0-1 (channel) / the first 2x2 tile (block) / 2 of each 4 (n:m) are kept
    mask = torch.zeros(4, 8, dtype=torch.bool)
    if pattern == "channel":
        mask[:2] = True
    elif pattern == "block2x2":
        mask[:2, :2] = True
    else:
        mask[:, 0::4] = True
        mask[:, 1::4] = True
    w = torch.randn(4, 8) * mask
    w[0, 0] = 0.0  # a kept weight that happens to be exactly zero
    ms = MaskSet({"weight": mask}, pattern)
    ms.verify(_model(w))  # valid model: must not raise


def test_verify_still_rejects_a_nonzero_pruned_weight_of_a_channel_mask() -> None:
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[:2] = True
    w = torch.randn(4, 8) * mask
    w[3, 5] = 0.25
    with pytest.raises(MaskError, match=r"weight at position \(3, 5\)"):
        MaskSet({"weight": mask}, "channel").verify(_model(w))


def test_verify_rejects_a_mask_that_breaks_its_pattern() -> None:
    mask = torch.ones(4, 8, dtype=torch.bool)
    mask[0, 0] = False  # a channel mask must prune whole rows
    with pytest.raises(MaskError, match="breaks pattern channel"):
        MaskSet({"weight": mask}, "channel").verify(_model(torch.randn(4, 8) * mask))


@pytest.mark.parametrize(
    "meta",
    [
        [1, 2],  # list instead of an object
        {"version": "1", "patterns": {}},  # string version
        {"version": 1.5, "patterns": {}},
        {"version": True, "patterns": {}},
        {"version": 99, "patterns": {}},  # from the future
        {"version": 1, "patterns": ["unstructured"]},
        {"version": 1, "patterns": {"w": 4}},
        {"version": 1, "patterns": {"w": "5:4"}},  # unparsable pattern
        {"version": 1, "patterns": {"other": "unstructured"}},  # names a tensor it lacks
    ],
)
def test_load_rejects_malformed_metadata_with_checkpoint_error(tmp_path, meta) -> None:
    path = tmp_path / "masks.safetensors"
    save_file({"w": torch.ones(2, 4, dtype=torch.bool)}, str(path), metadata={"sparsetorch_masks": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="mask file"):
        MaskSet.load(path)


def test_load_round_trips_a_valid_file(tmp_path) -> None:
    m = torch.tensor([[True, False, True, False]])
    ms = MaskSet({"w": m}, "2:4")
    ms.save(tmp_path / "m.safetensors")
    back = MaskSet.load(tmp_path / "m.safetensors")
    assert torch.equal(back.masks["w"], m) and str(back.patterns["w"]) == "2:4"
