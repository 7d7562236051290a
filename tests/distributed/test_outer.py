"""DiLoCo and SparseLoCo on 2 gloo ranks, against their definitions.

* DiLoCo with H = 1, inner SGD and outer SGD at lr 1 without momentum is data-parallel SGD;
* SparseLoCo's error feedback loses nothing (β = 1): what moved the parameters plus the mean of
  the residuals left equals the mean of every rank's pseudo-gradients;
* masks hold after every outer step, ranks stay identical, bytes follow from the layout.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from toy_mlp import STEPS, toy_batch, toy_model

from sparsetorch.distributed import run_local
from sparsetorch.distributed.outer import (
    OuterLoop,
    chunk_counts,
    chunk_topk,
    dequantize_2bit,
    quantize_2bit,
)
from sparsetorch.errors import DistributedError
from sparsetorch.masks import MaskSet


def _masks(model: nn.Module) -> MaskSet:
    g = torch.Generator().manual_seed(7)  # the same on every rank
    return MaskSet({n: torch.rand(p.shape, generator=g) < 0.4 for n, p in model.named_parameters() if p.dim() == 2})


def _ddp_sgd(rank: int, world: int) -> dict:
    model = toy_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        x, y = toy_batch(step, rank)
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _outer(rank: int, world: int, method: str, masked: bool = False, **kw) -> dict:
    model = toy_model()
    if rank == 1:  # replicas start different: the loop must broadcast rank 0's parameters
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    masks = _masks(model) if masked else None
    if masks is not None:
        masks.apply(model)
    loop = OuterLoop(model, method, masks=masks, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    moved = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    pseudo = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    masks_held, digests = True, []
    for step in range(STEPS):
        x, y = toy_batch(step, rank)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if masks is not None:
            masks.apply(model)  # the inner loop keeps its masks (MaskSet.enforce in real runs)
        before = {n: t.clone() for n, t in loop.start.items()}
        local = {n: before[n] - p.detach() for n, p in model.named_parameters()}
        if loop.step():
            for n, p in model.named_parameters():
                moved[n] += before[n] - p.detach()
                pseudo[n] += local[n]
                if masks is not None and n in masks:
                    masks_held &= bool((p[~masks[n]] == 0).all())
            digests.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).sum().item())
    out = {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "bytes": loop.bytes_sent,
           "outer_steps": loop.outer_steps, "masks_held": masks_held, "digests": digests}
    if method == "sparseloco":
        gap = 0.0
        for n in moved:
            e = loop.errors[n].clone()
            s = pseudo[n].clone()
            dist.all_reduce(e)
            dist.all_reduce(s)
            gap = max(gap, (moved[n] + e / world - s / world).abs().max().item())
        out["ef_gap"] = gap
    return out


def _worker(rank: int, world: int) -> dict:
    return {
        "ddp": _ddp_sgd(rank, world),
        "diloco_h1": _outer(rank, world, "diloco", sync_every=1, outer_lr=1.0, outer_momentum=0.0),
        "diloco": _outer(rank, world, "diloco", masked=True, sync_every=2),
        "sparseloco_raw": _outer(rank, world, "sparseloco", sync_every=2, chunk=64, density=0.125,
                                 ef_decay=1.0, quantize=False),
        "sparseloco_2bit": _outer(rank, world, "sparseloco", sync_every=2, chunk=64, density=0.125, ef_decay=1.0),
        "sparseloco_masked": _outer(rank, world, "sparseloco", masked=True, sync_every=3, chunk=64, density=0.125),
    }


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_local(_worker, 2, timeout_s=150, pg_timeout_s=30)


def test_diloco_h1_plain_outer_sgd_is_data_parallel_sgd(ranks) -> None:
    for n, p in ranks[0]["ddp"].items():
        torch.testing.assert_close(ranks[0]["diloco_h1"]["params"][n], p, rtol=0, atol=1e-13)
    assert ranks[0]["diloco_h1"]["outer_steps"] == STEPS


@pytest.mark.parametrize("key", ["diloco", "sparseloco_raw", "sparseloco_2bit", "sparseloco_masked"])
def test_replicas_agree_after_every_outer_step_and_masks_hold(ranks, key) -> None:
    r0, r1 = ranks[0][key], ranks[1][key]
    assert r0["digests"] == r1["digests"] and r0["outer_steps"] >= 2
    for n, p in r0["params"].items():
        assert torch.equal(r1["params"][n], p), n
    assert r0["masks_held"] and r1["masks_held"]


@pytest.mark.parametrize("key", ["sparseloco_raw", "sparseloco_2bit"])
def test_sparseloco_error_feedback_loses_nothing(ranks, key) -> None:
    for r in ranks:
        assert r[key]["ef_gap"] < 1e-12, r[key]["ef_gap"]


def test_bytes_follow_from_the_layout(ranks) -> None:
    model = toy_model()
    sizes = [p.numel() for p in model.parameters()]
    counts = [int(chunk_counts(n, 64, 8).sum()) for n in sizes]
    steps = STEPS // 2
    # W = 2 all_gather: (W-1) x own bytes; int16 offsets + float32 values / + table + 2-bit codes
    assert ranks[0]["sparseloco_raw"]["bytes"] == steps * sum(c * (2 + 4) for c in counts)
    assert ranks[0]["sparseloco_2bit"]["bytes"] == steps * sum(2 * c + 16 + math.ceil(c / 4) for c in counts)
    live = sum(int(m.sum()) for m in _masks(model).masks.values()) + sum(
        p.numel() for p in model.parameters() if p.dim() != 2)
    assert ranks[0]["diloco"]["bytes"] == steps * live * 8  # W = 2 all-reduce: the packed fp64 vector


def test_chunk_topk_picks_the_largest_live_entries_per_chunk() -> None:
    g = torch.Generator().manual_seed(0)
    e = torch.randn(150, generator=g)
    live = torch.rand(150, generator=g) < 0.5
    idx = chunk_topk(e, 64, 8, live)
    counts = chunk_counts(150, 64, 8, live)
    assert counts.tolist() == [8, 8, min(math.ceil(8 * 22 / 64), int(live[128:].sum()))]
    assert live[idx].all() and idx.numel() == int(counts.sum())
    for c in range(3):
        seg = slice(64 * c, 64 * (c + 1))
        chosen = idx[(idx >= 64 * c) & (idx < 64 * (c + 1))]
        rest = torch.ones(150, dtype=torch.bool)
        rest[chosen] = False
        rest &= live
        rest[:64 * c] = False
        rest[64 * (c + 1):] = False
        if rest.any():
            assert e.abs()[chosen].min() >= e.abs()[rest].max()
        del seg


def test_2bit_quantisation_decodes_to_bin_means() -> None:
    g = torch.Generator().manual_seed(1)
    v = torch.randn(1000, generator=g)
    codes, table = quantize_2bit(v)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 3
    dec = dequantize_2bit(codes, table)
    for b in range(4):
        if (codes == b).any():
            torch.testing.assert_close(table[b], v[codes == b].mean())
    assert (dec - v).abs().mean() < v.abs().mean()  # closer than sending nothing


def test_bad_settings_are_typed_errors() -> None:
    m = toy_model()
    for kw, msg in (({"method": "adam"}, "outer method"), ({"sync_every": 0}, "sync_every"),
                    ({"density": 0.0}, "density"), ({"chunk": 0}, "chunk"), ({"ef_decay": 2.0}, "ef_decay")):
        with pytest.raises(DistributedError, match=msg):
            OuterLoop(m, **kw)
    with pytest.raises(DistributedError, match="process group"):
        OuterLoop(m, "diloco", 10)
