"""DynamicSparsifier against its definition: defaults, argument bounds, update steps, drop counts.

Written to kill the mutants mutmut left alive in ``training/_dst.py`` (benchmarks/mutation_scores.py):
each test states one rule of the method, with numbers worked out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparsetorch.errors import MethodError
from sparsetorch.training.set import SET


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20, bias=False), nn.Linear(20, 4, bias=False))


def test_defaults_are_the_papers() -> None:
    sp = SET(total_steps=1000)
    assert sp.sparsity == 0.9 and sp.update_every == 100 and sp.drop_fraction == 0.3
    assert sp.decay == "cosine" and sp.start == 0 and sp.end == 750


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"update_every": 0}, "update_every must be a positive number of steps, got 0"),
        ({"drop_fraction": 0.0}, r"drop_fraction must be in \(0, 1\], got 0.0"),
        ({"drop_fraction": 1.5}, r"drop_fraction must be in \(0, 1\], got 1.5"),
        ({"drop_fraction": -0.1}, r"drop_fraction must be in \(0, 1\]"),
        ({"decay": "linear"}, "decay must be 'cosine' or 'constant', got 'linear'"),
    ],
)
def test_bad_arguments_name_the_rule(kwargs, message) -> None:
    with pytest.raises(MethodError, match=message):
        SET(0.5, total_steps=100, **kwargs)


def test_missing_run_length_says_what_to_pass() -> None:
    with pytest.raises(MethodError, match=r"needs total_steps \(or end=\.\.\.\) .* pass total_steps=len\(loader\) \* epochs\."):
        SET(0.5)


def test_drop_fraction_one_is_allowed() -> None:
    assert SET(0.5, total_steps=10, drop_fraction=1.0).drop_fraction == 1.0


def test_update_steps_include_start_and_end() -> None:
    sp = SET(0.5, total_steps=100, update_every=5, start=10, end=30, decay="constant")
    assert [s for s in range(0, 40) if sp.is_update_step(s)] == [10, 15, 20, 25, 30]
    assert [sp.fraction(s) for s in (9, 10, 30, 31)] == [0.0, 0.3, 0.3, 0.0]


def test_cosine_fraction_starts_at_start() -> None:
    sp = SET(0.5, total_steps=100, update_every=5, start=10, end=40, drop_fraction=0.4)
    assert sp.fraction(9) == 0.0 and sp.fraction(41) == 0.0
    assert sp.fraction(20) == pytest.approx(0.2 * (1 + math.cos(math.pi * 20 / 40)))


def _counts(sp: SET, model: nn.Module) -> dict[str, int]:
    return {n: int(m.sum()) for n, m in sp.masks.masks.items()}


def _largest(w: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` largest-|w| positions inside ``mask`` (ties by index), as a bool mask."""
    score = w.abs().masked_fill(~mask, -1.0).flatten()
    order = sorted(range(score.numel()), key=lambda i: (-float(score[i]), i))[:n]
    out = torch.zeros(score.numel(), dtype=torch.bool)
    out[order] = True
    return out.view(mask.shape)


def test_each_layer_replaces_floor_f_times_nnz_and_a_dense_layer_is_skipped() -> None:
    """First layer dense (nothing to grow into: skipped); the second drops its k = floor(0.3*nnz)
    smallest kept weights and grows k positions outside the nnz - k it keeps."""
    model = _model()
    sp = SET(0.5, total_steps=100, update_every=1, drop_fraction=0.3, decay="constant", end=10,
             dense=["0.weight"], allocation="uniform")
    sp.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    before = {n: m.clone() for n, m in sp.masks.masks.items()}
    w = model[1].weight.detach().clone()
    assert sp.step()  # step 1 is an update step
    after = sp.masks.masks
    assert torch.equal(after["0.weight"], before["0.weight"]) and bool(after["0.weight"].all())
    nnz = int(before["1.weight"].sum())
    k = math.floor(0.3 * nnz)
    assert nnz == 40 and k == 12
    keep = _largest(w, before["1.weight"], nnz - k)
    assert bool((after["1.weight"] | ~keep).all())  # the nnz - k largest stay
    assert int((after["1.weight"] & ~keep).sum()) == k  # exactly k grown
    assert int(after["1.weight"].sum()) == nnz


def test_a_single_weight_is_still_replaced() -> None:
    """k = 1 is a real update (not skipped): 4 kept weights, drop fraction 0.25 -> one moves."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    sp = SET(0.5, total_steps=100, update_every=1, drop_fraction=0.25, decay="constant", end=50)
    sp.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    w = model[0].weight.detach().clone()
    before = sp.masks.masks["0.weight"].clone()
    assert sp.step()
    after = sp.masks.masks["0.weight"]
    keep = _largest(w, before, 3)
    assert bool((after | ~keep).all()) and int((after & ~keep).sum()) == 1 and int(after.sum()) == 4
    changed = bool((before != after).any())
    for _ in range(10):  # regrowth is random: within a few updates some position really moves
        b = sp.masks.masks["0.weight"].clone()
        sp.step()
        changed |= bool((b != sp.masks.masks["0.weight"]).any())
    assert changed
