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
        assert abs(eff - 0.4) < 1e-9  # exactly: between the two path rows around it
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


# ---- across blocks (allocation="greedy-global") ----

def _mean(levels: dict[int, float], sizes: dict[int, int]) -> float:
    return sum(levels[b] * sizes[b] for b in levels) / sum(sizes.values())


def test_allocate_blocks_matches_brute_force_on_convex_costs() -> None:
    """Equal steps and sizes, convex costs: the greedy is the exact discrete optimum."""
    import itertools

    from sparsetorch.activation.greedy import allocate_blocks

    grid = [round(0.1 * i, 1) for i in range(7)]
    curv = {0: 1.0, 1: 4.0, 2: 0.3}
    costs = {b: {g: curv[b] * g * g + 0.05 * g for g in grid} for b in curv}
    sizes = dict.fromkeys(curv, 10)
    got = allocate_blocks(costs, sizes, 0.4)
    assert abs(_mean(got, sizes) - 0.4) < 1e-12
    best = min(sum(costs[b][g] for b, g in zip(curv, combo, strict=True))
               for combo in itertools.product(grid, repeat=3) if abs(sum(combo) / 3 - 0.4) < 1e-9)
    assert sum(costs[b][got[b]] for b in curv) == pytest.approx(best)
    assert got[2] > 0.4 > got[1]  # the cheap block takes more, the costly one less


def test_allocate_blocks_lands_on_the_target_between_measured_levels() -> None:
    from sparsetorch.activation.greedy import allocate_blocks

    costs = {0: {0.0: 0.0, 0.2: 0.1, 0.4: 0.3, 0.6: 0.9}, 1: {0.0: 0.0, 0.2: 0.0, 0.4: 0.0, 0.6: 0.0}}
    sizes = {0: 3, 1: 1}
    got = allocate_blocks(costs, sizes, 0.35)
    assert got[1] == 0.6  # free: its highest measured level
    assert abs(_mean(got, sizes) - 0.35) < 1e-12 and got[0] == pytest.approx((4 * 0.35 - 0.6) / 3)  # cut back
    same = allocate_blocks({b: {0.0: 0.0, 0.3: 1.0, 0.5: 3.0} for b in range(3)}, dict.fromkeys(range(3), 5), 0.3)
    assert same == dict.fromkeys(range(3), 0.3)  # equal costs: equal levels


def test_output_head_is_the_models_own_norm_and_lm_head() -> None:
    from sparsetorch.activation.greedy import output_head

    m = make_tiny_llama(layers=2)
    ids = _calib()[:1]
    got = {}
    h = m.model.layers[-1].register_forward_hook(lambda _m, _a, out: got.setdefault("h", out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        logits = m(ids).logits
        h.remove()
        assert torch.allclose(output_head(m)(got["h"]), logits, atol=1e-5)
    with pytest.raises(MethodError, match="final norm"):
        output_head(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_greedy_global_gives_an_idle_block_more_and_keeps_the_mean() -> None:
    """Block 1 with o_proj and down_proj zeroed adds nothing to the residual stream: sparsifying
    its inputs costs the model nothing, so the cross-block allocation must raise it above the
    target and lower the others, the mean over blocks staying at the target."""
    m = make_tiny_llama(layers=3)
    with torch.no_grad():
        m.model.layers[1].self_attn.o_proj.weight.zero_()
        m.model.layers[1].mlp.down_proj.weight.zero_()
    th = calibrate_thresholds(m, 0.4, calibration=_calib(), seq_len=48, allocation="greedy-global",
                              greedy_step=0.1, greedy_samples=2)
    assert th.allocation == "greedy-global"
    eff = {}
    for i in range(3):
        names = _block_names(th, i)
        eff[i] = sum(th.levels[n] * _sizes(m, [n]) for n in names) / _sizes(m, names)
    assert eff[1] >= 0.55 and min(eff[0], eff[2]) < 0.4 and max(eff[0], eff[2]) <= 0.4 + 1e-9
    assert abs(sum(eff.values()) / 3 - 0.4) <= 0.04  # path rows are 0.1 x the smallest group apart
    back = calibrate_thresholds(m, 0.4, calibration=_calib(), seq_len=48, allocation="greedy",
                                greedy_step=0.1, greedy_samples=2)
    assert any(th.levels[n] != back.levels[n] for n in th.levels)
