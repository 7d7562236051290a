"""TEAL's greedy per-block allocation: levels shared by the projections of one input, the block's
effective sparsity at the target, and the search raising the group that costs least."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_llama

from sparsetorch.activation import ActivationThresholds, calibrate_thresholds
from sparsetorch.activation.greedy import input_groups
from sparsetorch.errors import MethodError


def _calib(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(seed))


def _sizes(m: torch.nn.Module, names: list[str]) -> int:
    return sum(m.get_submodule(n).weight.numel() for n in names)


def _block_names(th: ActivationThresholds, i: int) -> list[str]:
    return [n for n in th.levels if f"layers.{i}." in n]


def test_projections_of_one_input_form_one_group() -> None:
    m = make_tiny_llama(layers=1)
    names = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and "layers" in n]
    groups = sorted(sorted(n.rsplit(".", 1)[-1] for n in g) for g in input_groups(m, names, {"input_ids": _calib()[:1]}))
    assert groups == [["down_proj"], ["gate_proj", "up_proj"], ["k_proj", "q_proj", "v_proj"], ["o_proj"]]


def test_greedy_levels_hit_the_blocks_effective_sparsity_and_share_a_level_per_input() -> None:
    m = make_tiny_llama(layers=2)
    step = 0.1
    th = calibrate_thresholds(m, 0.4, calibration=_calib(), seq_len=48, allocation="greedy", greedy_step=step,
                              greedy_samples=2)
    assert th.allocation == "greedy" and set(th.levels) == set(th.thresholds)
    for i in range(2):
        names = _block_names(th, i)
        eff = sum(th.levels[n] * _sizes(m, [n]) for n in names) / _sizes(m, names)
        smin = min(_sizes(m, [n]) for n in names if n.endswith("o_proj"))
        assert abs(eff - 0.4) <= step * smin / _sizes(m, names)  # the nearest row of the path
        lv = {n.rsplit(".", 1)[-1]: th.levels[n] for n in names}
        assert lv["q_proj"] == lv["k_proj"] == lv["v_proj"] and lv["gate_proj"] == lv["up_proj"]
        same = [n for n in names if n.endswith(("q_proj", "k_proj", "v_proj"))]
        assert len({th.thresholds[n] for n in same}) == 1  # one input, one histogram, one level
    assert len(set(th.levels.values())) > 1  # not uniform


def test_greedy_raises_the_groups_that_change_the_block_least_first() -> None:
    """With block 0's o_proj zeroed its attention branch adds nothing, so sparsifying the inputs of
    q/k/v and o costs no error: the search must spend the budget there before touching the MLP."""
    m = make_tiny_llama(layers=2)
    with torch.no_grad():
        m.model.layers[0].self_attn.o_proj.weight.zero_()
    names = _block_names(calibrate_thresholds(m, 0.1, calibration=_calib(), seq_len=48), 0)
    attn = _sizes(m, [n for n in names if "self_attn" in n]) / _sizes(m, names)
    th = calibrate_thresholds(m, 0.5 * attn, calibration=_calib(), seq_len=48, allocation="greedy", greedy_step=0.1)
    lv = {n.rsplit(".", 1)[-1]: th.levels[n] for n in _block_names(th, 0)}
    assert lv["gate_proj"] == lv["up_proj"] == lv["down_proj"] == 0.0
    assert lv["q_proj"] + lv["o_proj"] > 0.4
    # block 1 is untouched: there the MLP inputs get some of the budget
    lv1 = {n.rsplit(".", 1)[-1]: th.levels[n] for n in _block_names(th, 1)}
    assert max(lv1["gate_proj"], lv1["down_proj"]) > 0.0


def test_greedy_thresholds_round_trip_and_bad_options(tmp_path) -> None:
    m = make_tiny_llama(layers=1)
    th = calibrate_thresholds(m, 0.3, calibration=_calib(), seq_len=48, allocation="greedy")
    back = ActivationThresholds.load(th.save(tmp_path / "t.safetensors"))
    assert back == th and back.allocation == "greedy" and back.levels == th.levels
    for kw, msg in (({"allocation": "best"}, "allocation"), ({"allocation": "greedy", "greedy_step": 0},
                                                              "greedy_step"),
                    ({"allocation": "greedy", "greedy_samples": 0}, "greedy_samples")):
        with pytest.raises(MethodError, match=msg):
            calibrate_thresholds(m, 0.3, calibration=_calib(), seq_len=48, **kw)
