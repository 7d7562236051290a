"""benchmarks/sparse_backprop.py: the round-robin step timing shared by the LLM and CNN arms (order
rotates, round 0 is a warm-up and not counted, medians), and the per-arm AdamW steps it times."""

from __future__ import annotations

import pytest
import torch
from bench_module import load_benchmark
from torch import nn

from sparsetorch import MaskSet


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("sparse_backprop")


def test_round_robin_rotates_skips_warmup_and_takes_medians(bench, monkeypatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    # seconds each arm's step takes in rounds 0..3 (round 0: a slow warm-up that must not count)
    cost = {"a": [100.0, 1.0, 3.0, 2.0], "b": [100.0, 10.0, 30.0, 20.0], "c": [100.0, 5.0, 5.0, 7.0]}
    calls: list[tuple[int, str]] = []

    def step_of(arm: str):
        def step(r: int) -> None:
            calls.append((r, arm))
            clock[0] += cost[arm][r]
        return step

    out = bench.round_robin({arm: step_of(arm) for arm in cost}, rounds=3)
    firsts = [arm for i, (r, arm) in enumerate(calls) if i % 3 == 0]
    assert firsts == ["a", "b", "c", "a"]  # the first arm rotates
    assert [arm for r, arm in calls if r == 1] == ["b", "c", "a"]
    assert out["rounds"] == 3
    assert out["samples"] == {"a": [1.0, 3.0, 2.0], "b": [10.0, 30.0, 20.0], "c": [5.0, 5.0, 7.0]}
    assert out["s_per_step"] == {"a": 2.0, "b": 20.0, "c": 5.0}


def test_arm_steps_copy_the_base_and_train_only_the_arm(bench) -> None:
    base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    masks = MaskSet({"0.weight": torch.rand(8, 8) > 0.5, "2.weight": torch.rand(2, 8) > 0.5})
    before = {k: v.clone() for k, v in base.state_dict().items()}
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 0, 1])
    seen: list[int] = []

    def loss(m: nn.Module, r: int) -> torch.Tensor:
        seen.append(r)
        return nn.functional.cross_entropy(m(x), y)

    steps = bench._arm_steps(base, {"full": None, "bias": "bias"}, masks, loss)
    out = bench.round_robin(steps, rounds=2)
    assert sorted(out["s_per_step"]) == ["bias", "full"] and all(len(v) == 2 for v in out["samples"].values())
    assert sorted(seen) == [0, 0, 1, 1, 2, 2]
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # each arm trains a copy
    assert all(p.requires_grad for p in base.parameters())


def test_llm_arm_names_specs_and_per_arm_lr(bench) -> None:
    assert bench.llm_arm("last:4") == ("last:4", None)
    assert bench.llm_arm("lora r=16") == ("lora", None)
    assert bench.llm_arm("full lr=3e-4") == (None, 3e-4)
    assert bench.llm_arm("last:8+norm lr=1e-2") == ("last:8+norm", 1e-2)  # a spec that is no named arm


def _arm(name: str, spec, ppl: float, s: float, mem: int) -> dict:
    return {"arm": name, "spec": spec, "ppl_e16_after": ppl, "s_per_step": s,
            "step": {"grad_optimizer_bytes": mem}}


def test_summarise_divides_by_the_best_full_arm(bench) -> None:
    # an lr sweep of full fine-tuning: the better full run (gain 4) is the denominator, even when a
    # sparse arm and the worse full run come before it in the list
    arms = [_arm("last:2 lr=1e-3", "last:2", 16.6, 1.0, 10), _arm("full", None, 18.0, 4.0, 100),
            _arm("full lr=3e-4", None, 16.0, 4.0, 100)]
    data = {"llm": {"ppl_e16_before": 20.0, "arms": arms}}
    bench.summarise(data)
    sec = data["llm"]
    assert sec["full_arm"] == "full lr=3e-4"
    assert [round(r["gain_ratio"], 6) for r in arms] == [0.85, 0.5, 1.0]
    assert arms[0]["time_ratio"] == 0.25 and arms[0]["memory_ratio"] == 0.1
    assert arms[0]["meets_target"] and sec["target_met"]
    arms[0]["ppl_e16_after"] = 16.81  # gain 3.19 < 0.8 x 4
    bench.summarise(data)
    assert not arms[0]["meets_target"] and not sec["target_met"]
