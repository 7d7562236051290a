"""MaskSet against its documented behaviour, for the cases mutation testing found unchecked."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sparsetorch import MaskSet
from sparsetorch.errors import CheckpointError, MaskError, PatternError


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight[0, :2] = 0
        net[1].weight[1, 1] = 0
    return net


def test_from_model_honours_targets_and_ignore() -> None:
    net = _net()
    assert sorted(MaskSet.from_model(net, targets=["0.weight"]).masks) == ["0.weight"]
    assert sorted(MaskSet.from_model(net, ignore=["0.weight"]).masks) == ["1.weight"]
    ms = MaskSet.from_model(net)
    assert torch.equal(ms.masks["0.weight"], net[0].weight != 0) and int((~ms.masks["1.weight"]).sum()) == 1


def test_set_checks_the_shape_and_stores_bool() -> None:
    ms = MaskSet({"w": torch.ones(2, 4, dtype=torch.bool)})
    with pytest.raises(MaskError, match=r"new mask for 'w' has shape \(4, 2\), expected \(2, 4\)\."):
        ms.set("w", torch.ones(4, 2, dtype=torch.bool))
    ms.set("w", torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))
    assert ms.masks["w"].dtype == torch.bool and int(ms.masks["w"].sum()) == 3


def test_state_dict_layout_and_defaults() -> None:
    ms = MaskSet({"w": torch.tensor([True, False])}, "unstructured")
    st = ms.state_dict()
    assert st["version"] == 1 and set(st) == {"version", "masks", "patterns"}
    fresh = MaskSet({})
    fresh.load_state_dict({"masks": {"w": torch.tensor([False, True])}})  # no patterns: unstructured
    assert str(fresh.patterns["w"]) == "unstructured"
    with pytest.raises(CheckpointError, match=r"^mask state is missing 'masks'; was it made by MaskSet\.state_dict\(\)\?$"):
        fresh.load_state_dict({"patterns": {}})


def test_saved_metadata_names_the_version(tmp_path) -> None:
    p = tmp_path / "m.safetensors"
    MaskSet({"w": torch.tensor([True, False])}).save(p)
    with safe_open(str(p), framework="pt") as f:
        meta = json.loads(f.metadata()["sparsetorch_masks"])
    assert meta == {"version": 1, "patterns": {"w": "unstructured"}}


def _write(tmp_path, tensors, meta) -> str:
    p = tmp_path / "m.safetensors"
    save_file(tensors, str(p), metadata={"sparsetorch_masks": json.dumps(meta)})
    return str(p)


def test_load_messages_name_the_file_and_the_problem(tmp_path) -> None:
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=rf"mask file {bad} is corrupt or not a sparsetorch mask file"):
        MaskSet.load(bad)
    p = _write(tmp_path, {"w": torch.ones(2)}, {"version": 1, "patterns": {}})
    with pytest.raises(CheckpointError, match=rf"mask 'w' in {p} has dtype torch.float32, expected bool\."):
        MaskSet.load(p)
    p = _write(tmp_path, {"w": torch.ones(2, dtype=torch.bool)}, [1])
    with pytest.raises(CheckpointError, match=rf"mask file {p}: metadata 'sparsetorch_masks' must be a JSON object, got list"):
        MaskSet.load(p)
    names = {f"n{i}": "unstructured" for i in range(5)}
    p = _write(tmp_path, {"w": torch.ones(2, dtype=torch.bool)}, {"version": 1, "patterns": names})
    with pytest.raises(CheckpointError) as exc:
        MaskSet.load(p)
    assert "['n0', 'n1', 'n2']." in str(exc.value)  # at most three names
    p = _write(tmp_path, {"w": torch.ones(2, dtype=torch.bool)}, {"version": 1, "patterns": {"w": 4}})
    with pytest.raises(CheckpointError, match="'patterns' must map tensor names to pattern strings"):
        MaskSet.load(p)


@pytest.mark.parametrize("meta", [{}, {"version": 0}, {"patterns": {}}, {"version": 1}])
def test_version_zero_or_missing_and_missing_patterns_still_load(tmp_path, meta) -> None:
    p = _write(tmp_path, {"w": torch.tensor([True, False])}, meta)
    ms = MaskSet.load(p)
    assert torch.equal(ms.masks["w"], torch.tensor([True, False])) and str(ms.patterns["w"]) == "unstructured"


def test_repr_counts_tensors_and_sparsity() -> None:
    assert repr(MaskSet({"a": torch.tensor([True, False]), "b": torch.tensor([True, True])})) == \
        "MaskSet(2 tensors, sparsity=0.2500)"


def test_empty_and_fresh_masksets() -> None:
    ms = MaskSet({})
    assert ms.sparsity().overall == 0.0 and ms.sparsity().per_layer == {}
    ms.rezero()  # nothing enforced yet: a no-op
    ms.release()
    ms.rezero()


def test_masks_must_be_tensors_and_are_stored_as_bool() -> None:
    with pytest.raises(MaskError, match=r"^mask for 'a' must be a tensor, got list\.$"):
        MaskSet({"a": [1, 0]})
    ms = MaskSet({"w": torch.tensor([1.0, 0.0, 3.0])})
    assert ms.masks["w"].dtype == torch.bool and ms.masks["w"].tolist() == [True, False, True]


def test_from_scores_takes_a_pattern_per_name_and_names_a_misfit() -> None:
    scores = {"a": torch.arange(8.0).view(2, 4), "b": torch.arange(8.0).view(2, 4)}
    ms = MaskSet.from_scores(scores, 0.5, {"a": "2:4", "b": "channel"})
    assert str(ms.patterns["a"]) == "2:4" and str(ms.patterns["b"]) == "channel"
    assert ms.masks["b"].tolist() == [[False] * 4, [True] * 4]
    with pytest.raises(PatternError, match="odd_layer"):
        MaskSet.from_scores({"odd_layer": torch.ones(2, 6)}, 0.5, "4:8")


def test_unknown_names_get_suggestions() -> None:
    from sparsetorch.errors import TargetError

    ms = MaskSet({"layer.weight": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(TargetError, match=r"^no mask for 'layer\.wieght'\. Did you mean: layer\.weight\?$"):
        ms["layer.wieght"]


def test_verify_messages_say_what_was_given() -> None:
    ms = MaskSet({"gone": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(MaskError, match=r"^mask 'gone' names no parameter of the tensors\. The masks were made for a different model\.$"):
        ms.verify({"w": torch.ones(2, 2)})
    with pytest.raises(MaskError, match=r"names no parameter of Linear\..* The masks were made for a different model\.$"):
        ms.verify(nn.Linear(2, 2))


def test_enforce_hooks_every_trainable_masked_parameter_after_a_frozen_one() -> None:
    net = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    net[0].weight.requires_grad_(False)
    m1 = torch.tensor([[True, False, True]] * 3)
    ms = MaskSet({"0.weight": torch.ones(3, 3, dtype=torch.bool), "1.weight": m1}).enforce(net)
    net(torch.randn(4, 3)).sum().backward()
    assert bool((net[1].weight.grad[~m1] == 0).all()) and bool((net[1].weight.grad[m1] != 0).any())
    ms.release()
    ms.rezero()  # released: nothing left to re-zero


def test_one_element_sparsity() -> None:
    st = MaskSet({"a": torch.tensor([False]), "b": torch.tensor([True, False])}).sparsity()
    assert st.per_layer == {"a": 1.0, "b": 0.5} and st.overall == pytest.approx(2 / 3)
