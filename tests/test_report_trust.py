"""Saved folders with unusual tensor names verify and report; unbuildable names raise typed errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sparsetorch import MaskSet
from sparsetorch.analysis.report import folder_report, tensors_module, verify_folder
from sparsetorch.errors import CheckpointError, MaskError


@pytest.mark.parametrize("odd", ["a..b", "x.weight.extra", ".lead", "trail."])
def test_verify_and_report_a_folder_with_odd_weight_keys(tmp_path, odd: str) -> None:
    mask = torch.rand(4, 4) > 0.5
    save_file({"x.weight": torch.randn(4, 4) * mask, odd: torch.randn(2, 2)}, str(tmp_path / "model.safetensors"))
    MaskSet({"x.weight": mask}).save(tmp_path / "masks.safetensors")
    assert torch.equal(verify_folder(tmp_path).masks["x.weight"], mask)
    rows, masks = folder_report(tmp_path)
    assert masks is not None and any(r.get("name", r.get("tensor")) == "x.weight" for r in rows)


def test_verify_folder_names_a_nonzero_pruned_weight(tmp_path) -> None:
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[1, 2] = False
    w = torch.randn(4, 4)
    w[1, 2] = 1.0
    save_file({"x.weight": w, "x.weight.extra": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    MaskSet({"x.weight": mask}).save(tmp_path / "masks.safetensors")
    with pytest.raises(MaskError, match=r"x\.weight: weight at position \(1, 2\)"):
        verify_folder(tmp_path)


@pytest.mark.parametrize("names", [["a..b"], ["x.weight", "x.weight.extra"], ["x.weight.extra", "x.weight"], ["trail."]])
def test_tensors_module_rejects_names_no_module_can_have(names: list[str]) -> None:
    with pytest.raises(CheckpointError, match="tensor name"):
        tensors_module({n: torch.zeros(1) for n in names})


def test_tensors_module_builds_dotted_names() -> None:
    m = tensors_module({"a.0.weight": torch.ones(2), "a.0.bias": torch.zeros(1), "b": torch.ones(3)})
    assert sorted(n for n, _ in m.named_parameters()) == ["a.0.bias", "a.0.weight", "b"]
