"""Masks under data parallelism (2 spawned gloo processes on 127.0.0.1 via a file rendezvous).

The definition: RigL on 2 ranks, each with its own batch, under DDP must make exactly the
decisions of RigL on one process fed both batches at once (the mean loss over the union has the
averaged gradient). Without ``sparsetorch.distributed.attach`` the ranks grow from their own
dense gradients and their masks drift apart, which ``verify_consistent`` must report.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from sparsetorch.distributed import attach, mask_digests, run_local, verify_consistent
from sparsetorch.errors import DistributedError
from sparsetorch.training import get_method

STEPS = 12
KW = {"sparsity": 0.8, "allocation": "uniform", "update_every": 2, "total_steps": STEPS, "seed": 3}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)).double()


def _batch(step: int, rank: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(n, 12, generator=g, dtype=torch.float64)
    return x, torch.sin(x[:, :3] * (rank + 1)) + 0.1 * torch.randn(n, 3, generator=g, dtype=torch.float64)


def _method(name: str):  # noqa: ANN202
    if name == "snfs":
        return get_method("snfs", sparsity=0.8, update_every=2, total_steps=STEPS, seed=3)
    if name in ("rigl", "set"):
        return get_method(name, **KW)
    return get_method(name, sparsity=0.8, allocation="uniform", seed=3)


def _train(name: str, distributed: bool, world: int, rank: int) -> dict:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = _method(name)
    data = [_batch(-1, rank)]  # rank-local data for data-dependent init (SNIP)
    if distributed:
        attach(sp, model, opt, data=data)
    else:
        sp.attach(model, opt, data=data)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    digests = [mask_digests(sp.masks).tolist()]
    grads_masked = True
    for step in range(STEPS):
        if world > 1:
            x, y = _batch(step, rank)
        else:  # one process sees the union of every rank's batch
            parts = [_batch(step, r) for r in range(2)]
            x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        nn.functional.mse_loss(net(x), y).backward()
        for n, p in model.named_parameters():
            if n in sp.masks and p.grad is not None:
                grads_masked &= bool((p.grad[~sp.masks[n]] == 0).all())
        opt.step()
        opt.zero_grad()
        if sp.step():
            digests.append(mask_digests(sp.masks).tolist())
    error = None
    if world > 1:
        try:
            verify_consistent(sp.masks)
        except DistributedError as exc:
            error = str(exc)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"digests": digests, "error": error, "grads_masked": grads_masked, "params": params}


def _worker(rank: int, world: int) -> dict:
    return {f"{name}/{mode}": _train(name, mode == "dist", world, rank)
            for name, mode in (("rigl", "dist"), ("rigl", "plain"), ("snfs", "dist"), ("set", "dist"),
                               ("snip", "dist"), ("snip", "plain"))}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_local(_worker, 2, timeout_s=150, pg_timeout_s=30)


@pytest.mark.parametrize("key", ["rigl/dist", "snfs/dist", "set/dist", "snip/dist"])
def test_masks_identical_on_every_rank_at_every_update(two_ranks, key) -> None:
    r0, r1 = two_ranks[0][key], two_ranks[1][key]
    assert r0["digests"] == r1["digests"] and r0["error"] is None and r1["error"] is None
    if key.split("/")[0] in ("rigl", "snfs", "set"):
        assert len(r0["digests"]) > 3 and len({tuple(d) for d in r0["digests"]}) > 2, "masks never changed"
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), f"parameters drifted apart: {n}"
    assert r0["grads_masked"] and r1["grads_masked"], "a pruned position received a gradient under DDP"


def test_rigl_under_ddp_equals_rigl_on_the_union_of_the_batches(two_ranks) -> None:
    """Definition: the averaged gradient of 2 equal batches is the gradient of their union's mean."""
    one = _train("rigl", False, 1, 0)
    assert two_ranks[0]["rigl/dist"]["digests"] == one["digests"]
    for n, p in one["params"].items():
        torch.testing.assert_close(two_ranks[0]["rigl/dist"]["params"][n], p, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("key", ["rigl/plain", "snip/plain"])
def test_rank_local_decisions_diverge_and_are_reported(two_ranks, key) -> None:
    """Without distributed.attach, each rank decides from its own data: masks differ, and
    verify_consistent says so on every rank, naming a tensor and the differing positions."""
    r0, r1 = two_ranks[0][key], two_ranks[1][key]
    assert r0["digests"] != r1["digests"]
    for r in (r0, r1):
        assert r["error"] is not None and "rank 1 disagrees with rank 0" in r["error"]
        assert "positions" in r["error"] and "distributed.attach" in r["error"]


def _fails_on_rank_1(rank: int, world: int) -> int:
    if rank == 1:
        raise ValueError("planted failure")
    dist.barrier()  # rank 0 waits for the dead rank until the short process-group timeout
    return rank


def _hangs(rank: int, world: int) -> int:
    import time

    time.sleep(300)
    return rank


def test_run_local_reports_a_failed_rank_within_bounded_time() -> None:
    import time

    t0 = time.monotonic()
    with pytest.raises(DistributedError, match="rank 1 of 2 failed: ValueError: planted failure"):
        run_local(_fails_on_rank_1, 2, timeout_s=60, pg_timeout_s=5)
    assert time.monotonic() - t0 < 60


def test_run_local_kills_a_run_that_outlives_its_limit() -> None:
    with pytest.raises(DistributedError, match=r"did not finish within 6 s"):
        run_local(_hangs, 2, timeout_s=6, pg_timeout_s=5)


def test_bad_settings_and_no_process_group_are_typed_errors() -> None:
    with pytest.raises(DistributedError, match="nprocs"):
        run_local(_hangs, 0)
    with pytest.raises(DistributedError, match="timeouts"):
        run_local(_hangs, 2, timeout_s=0)
    sp = _method("rigl")
    with pytest.raises(DistributedError, match="init_process_group"):
        attach(sp, _model())
    assert sp.model is None  # nothing was attached
    from sparsetorch.masks import MaskSet

    with pytest.raises(DistributedError, match="init_process_group"):
        verify_consistent(MaskSet({"w": torch.ones(2, 2, dtype=torch.bool)}))
