"""Allocation search: the budget is met within 1e-3, and the result is accepted by the methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsetorch.allocation import erk
from sparsetorch.regularize.search import (
    allocation_error,
    dass_search,
    project_budget,
    random_search,
)
from sparsetorch.targets import select
from sparsetorch.training import get_method


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))


def data(n: int = 12, bs: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 4, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(bs, 16, generator=g)
        out.append((x, (x @ w).argmax(1)))
    return out


def test_project_budget_is_exact() -> None:
    numels = torch.tensor([100.0, 5000.0, 300.0, 20.0])
    for density in (0.01, 0.05, 0.3, 0.9):
        d = project_budget(torch.tensor([0.0, -2.0, 1.0, 3.0]), numels, density)
        assert abs(float((d * numels).sum()) / float(numels.sum()) - density) < 1e-9
        assert torch.all((d > 0) & (d <= 1))


def test_dass_allocation_meets_budget_and_moves() -> None:
    m = tiny()
    params = select(m)
    before = [p.detach().clone() for p in m.parameters()]
    alloc, info = dass_search(m, params, data(), 0.9, steps=25, seed=0)
    assert allocation_error(params, alloc, 0.9) < 1e-3
    assert set(alloc) == set(params)
    assert alloc != erk({n: p.detach() for n, p in params.items()}, 0.9)
    # the caller's model is untouched
    for a, b in zip(before, m.parameters()):
        torch.testing.assert_close(a, b.detach())
    assert info["start"]


def test_random_search_meets_budget_and_includes_the_base() -> None:
    m = tiny()
    params = select(m)
    alloc, info = random_search(m, params, data(), 0.95, trials=4, proxy_steps=5, val_batches=2, seed=0)
    assert allocation_error(params, alloc, 0.95) < 1e-3
    assert info["candidates"][0]["base"] is True
    for c in info["candidates"]:
        assert allocation_error(params, c["allocation"], 0.95) < 1e-3
    best = max(c["score"] for c in info["candidates"])
    assert info["candidates"][info["best"]]["score"] == best


def test_searched_allocation_is_accepted_by_rigl_and_realised() -> None:
    m = tiny()
    params = select(m)
    alloc, _ = dass_search(m, params, data(), 0.9, steps=5, seed=0)
    sp = get_method("rigl", sparsity=0.9, allocation=alloc, total_steps=20)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    masks = sp.attach(m, opt)
    per = masks.sparsity().per_layer
    for n, s in alloc.items():
        numel = params[n].numel()
        assert abs(per[n] - s) <= 1.0 / numel + 1e-12
    for x, y in data(4):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
        sp.step()
    masks.verify(m)
