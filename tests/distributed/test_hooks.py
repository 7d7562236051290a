"""Sparse gradient communication hooks, checked against their definitions on 2 gloo ranks.

* error feedback loses nothing: over a run, what was applied (the mean of what every rank sent)
  plus the mean of the residuals left equals the mean of every rank's gradients, exactly up to
  fp64 summation order;
* density 1 is data-parallel SGD; the counting hook is DDP's default, bit for bit;
* bytes are the ring-algorithm bytes of the tensors sent, computed here from k = ceil(d·n);
* ``precondition="adam"``: what the hook applies is the mean of every rank's own
  ``torch.optim.Adam`` step on its local gradient (density 1), and error feedback loses nothing of
  those steps (density 0.1).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from toy_mlp import STEPS, toy_batch, toy_model

from sparsetorch.distributed import attach, run_local
from sparsetorch.distributed.hooks import (
    TopKState,
    register_allreduce_counter,
    register_topk,
    topk_compress,
    topk_hook,
)
from sparsetorch.errors import DistributedError
from sparsetorch.training import get_method, reset_optimizer_state


def _ef_gap(state: TopKState, names: dict[int, str], applied: dict[str, torch.Tensor],
            offered: dict[str, torch.Tensor], world: int) -> float:
    """Error feedback loses nothing, averaged over ranks: what was applied + the mean residual left
    == the mean of what the ranks offered the compressor (gradients, or Adam steps), summed over
    steps. Returns the largest gap over all entries."""
    worst = 0.0
    for p_id, n in names.items():
        res = state.residuals[p_id].view_as(offered[n]).clone()
        total = offered[n].clone()
        dist.all_reduce(res)
        dist.all_reduce(total)
        worst = max(worst, (applied[n] + res / world - total / world).abs().max().item())
    return worst


def _run(rank: int, world: int, kind: str, **opts) -> dict:
    model = toy_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    state = None
    applied: dict[str, torch.Tensor] = {}
    local: dict[str, torch.Tensor] = {}
    names = {id(p): n for n, p in model.named_parameters()}
    if kind == "counting":
        state = register_allreduce_counter(ddp)
    elif kind.startswith("topk"):
        state = TopKState(density=opts.pop("density"), **opts)

        def recording(st, bucket):  # noqa: ANN001, ANN202 - DDP checks annotations as objects
            for p, g in zip(bucket.parameters(), bucket.gradients()):
                n = names[id(p)]
                local[n] = local.get(n, 0) + g.detach().clone()

            def keep(fut):  # noqa: ANN001, ANN202
                for p, g in zip(bucket.parameters(), bucket.gradients()):
                    n = names[id(p)]
                    applied[n] = applied.get(n, 0) + g.detach().clone()
                return fut.value()

            return topk_hook(st, bucket).then(keep)

        ddp.register_comm_hook(state, recording)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        x, y = toy_batch(step, rank)
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
    out = {"params": {n: p.detach().clone() for n, p in model.named_parameters()}}
    if state is not None:
        out["bytes_sent"] = state.bytes_sent
        out["bytes_last_step"] = state.bytes_last_step
        out["iteration"] = state.iteration
    if kind.startswith("topk"):
        out["ef_gap"] = _ef_gap(state, names, applied, local, world)
    return out


def _adam_run(rank: int, world: int, density: float, rigl: bool = False) -> dict:
    """precondition="adam" against its definition: a reference ``torch.optim.Adam`` (lr 1) per rank,
    fed this rank's local gradients, gives the directions; the hook must apply their mean (density
    1), and what it applied plus the mean residual must equal the mean of their sums (density < 1).

    ``rigl``: RigL (50%, a mask update every 2 steps) trains the model and the hook's state is
    reset on its mask changes; the reference Adam's state is reset at the same positions with
    ``reset_optimizer_state``, so a grown weight's first step must be a fresh Adam step."""
    betas = (0.9, 0.95)
    model = toy_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    shadow = {n: torch.zeros_like(p, requires_grad=True) for n, p in model.named_parameters()}
    ref = torch.optim.Adam(list(shadow.values()), lr=1.0, betas=betas, eps=1e-8)
    state = TopKState(density=density, precondition="adam", betas=betas)
    sp, grown = None, 0
    if rigl:
        sp = get_method("rigl", sparsity=0.5, update_every=2, total_steps=STEPS, seed=0)
        attach(sp, model, opt)
        sp.on_mask_change(state.reset)
        sp.on_mask_change(lambda p, where: reset_optimizer_state(ref, shadow[names[id(p)]], where))
    ddp = nn.parallel.DistributedDataParallel(model)
    local: dict[str, torch.Tensor] = {}
    applied: dict[str, torch.Tensor] = {}

    def recording(st, bucket):  # noqa: ANN001, ANN202
        for p, g in zip(bucket.parameters(), bucket.gradients()):
            local[names[id(p)]] = g.detach().clone()

        def keep(fut):  # noqa: ANN001, ANN202
            for p, g in zip(bucket.parameters(), bucket.gradients()):
                applied[names[id(p)]] = g.detach().clone()
            return fut.value()

        return topk_hook(st, bucket).then(keep)

    ddp.register_comm_hook(state, recording)
    worst_step, dirs_sum, applied_sum = 0.0, {}, {}
    for step in range(STEPS):
        x, y = toy_batch(step, rank)
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
        for n, t in shadow.items():  # this rank's own Adam step on its own gradient
            t.grad = local[n].clone()
        before = {n: t.detach().clone() for n, t in shadow.items()}
        ref.step()
        for n, t in shadow.items():
            d = before[n] - t.detach()
            dirs_sum[n] = dirs_sum.get(n, 0) + d
            applied_sum[n] = applied_sum.get(n, 0) + applied[n]
            mean = d.clone()
            dist.all_reduce(mean)
            worst_step = max(worst_step, (applied[n] - mean / world).abs().max().item())
        if sp is not None:
            before_masks = {n: m.clone() for n, m in sp.masks.items()}
            if sp.step():
                grown += sum(int((m & ~before_masks[n]).sum()) for n, m in sp.masks.items())
    out = {"step_gap": worst_step, "params": {n: p.detach().clone() for n, p in model.named_parameters()},
           "moments": len(state.moments), "iteration": state.iteration, "grown": grown}
    if sp is None:
        out["ef_gap"] = _ef_gap(state, names, applied_sum, dirs_sum, world)
    else:  # after the last mask update no state is left on a pruned position
        by_name = dict(model.named_parameters())
        out["pruned_state"] = max(
            float(t.view_as(m)[~m].abs().max()) for n, m in sp.masks.items()
            for t in (state.residuals[id(by_name[n])], *state.moments[id(by_name[n])]))
    return out


def _wired(rank: int, world: int) -> float:
    """register_topk(..., sparsifier=sp) resets the hook's state on sp's mask changes: after
    RigL's updates no residual is left on a pruned position (without the reset the dense
    gradients of RigL's update steps leave some there). Returns the largest one left."""
    model = toy_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = get_method("rigl", sparsity=0.5, update_every=2, total_steps=STEPS, seed=0)
    attach(sp, model, opt)
    ddp = nn.parallel.DistributedDataParallel(model)
    state = register_topk(ddp, 0.1, sparsifier=sp)
    for step in range(STEPS):
        x, y = toy_batch(step, rank)
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
        sp.step()
    by_name = dict(model.named_parameters())
    return max(float(state.residuals[id(by_name[n])].view_as(m)[~m].abs().max()) for n, m in sp.masks.items())


def _worker(rank: int, world: int) -> dict:
    return {
        "wired": _wired(rank, world),
        "adam1": _adam_run(rank, world, 1.0),
        "adam10": _adam_run(rank, world, 0.1),
        "adam1_rigl": _adam_run(rank, world, 1.0, rigl=True),
        "adam10_rigl": _adam_run(rank, world, 0.1, rigl=True),
        "plain": _run(rank, world, "plain"),
        "counting": _run(rank, world, "counting"),
        "topk1": _run(rank, world, "topk1", density=1.0),
        "topk10": _run(rank, world, "topk10", density=0.1),
        "topk10_fp16": _run(rank, world, "topk10_fp16", density=0.1, value_dtype=torch.float16),
        "topk10_momentum": _run(rank, world, "topk10_momentum", density=0.1, momentum=0.9, warmup_steps=3,
                                clip_norm=10.0),
    }


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_local(_worker, 2, timeout_s=150, pg_timeout_s=30)


def _sizes() -> list[int]:
    return [p.numel() for p in toy_model().parameters()]


def test_counting_hook_is_ddp_default_bit_for_bit_and_counts_ring_bytes(ranks) -> None:
    for r in ranks:
        for n, p in r["plain"]["params"].items():
            assert torch.equal(r["counting"]["params"][n], p), n
        # fp64 all-reduce: each step sends 2(W-1)/W of the gradient's bytes (W = 2: all of them)
        assert r["counting"]["bytes_last_step"] == sum(_sizes()) * 8
        assert r["counting"]["bytes_sent"] == STEPS * sum(_sizes()) * 8


def test_density_one_is_data_parallel_sgd(ranks) -> None:
    for n, p in ranks[0]["plain"]["params"].items():
        torch.testing.assert_close(ranks[0]["topk1"]["params"][n], p, rtol=0, atol=1e-13)


def test_adam_precondition_applies_the_mean_of_every_ranks_adam_step(ranks) -> None:
    for r in ranks:
        assert r["adam1"]["step_gap"] < 1e-12, r["adam1"]["step_gap"]
        assert r["adam1"]["moments"] == len(_sizes()) and r["adam1"]["iteration"] == STEPS


def test_adam_precondition_error_feedback_loses_nothing(ranks) -> None:
    for r in ranks:
        assert r["adam10"]["step_gap"] > 1e-3  # at density 0.1 most of each step waits in the residual
        assert r["adam10"]["ef_gap"] < 1e-12, r["adam10"]["ef_gap"]


def test_a_mask_change_resets_the_hooks_state_like_the_optimizers(ranks) -> None:
    """RigL grows weights mid-run: with the hook's state reset at grown and pruned positions, the
    applied step is still the mean of each rank's reference Adam step (whose state is reset by
    ``reset_optimizer_state`` at the same positions), and nothing is left on pruned positions."""
    for r in ranks:
        assert r["adam1_rigl"]["grown"] > 0  # else nothing was tested
        assert r["adam1_rigl"]["step_gap"] < 1e-12, r["adam1_rigl"]["step_gap"]
        assert r["adam10_rigl"]["grown"] > 0
        assert r["adam10_rigl"]["pruned_state"] == 0.0
        assert r["wired"] == 0.0


@pytest.mark.parametrize("key", ["topk10", "topk10_fp16", "topk10_momentum", "adam10", "adam10_rigl"])
def test_ranks_stay_identical(ranks, key) -> None:
    for n, p in ranks[0][key]["params"].items():
        assert torch.equal(ranks[1][key]["params"][n], p), n


@pytest.mark.parametrize("key", ["topk10", "topk10_fp16"])
def test_error_feedback_loses_nothing(ranks, key) -> None:
    for r in ranks:
        assert r[key]["ef_gap"] < 1e-12, r[key]["ef_gap"]


def test_topk_bytes_follow_from_k(ranks) -> None:
    ks = [math.ceil(0.1 * n) for n in _sizes()]
    # W = 2: an all-gather sends (W-1) x own payload; fp64 values (8 B) + int32 indices (4 B)
    assert ranks[0]["topk10"]["bytes_sent"] == STEPS * sum(k * (8 + 4) for k in ks)
    assert ranks[0]["topk10_fp16"]["bytes_sent"] == STEPS * sum(k * (2 + 4) for k in ks)
    assert ranks[0]["topk10"]["iteration"] == STEPS
    dense = ranks[0]["counting"]["bytes_sent"]
    assert ranks[0]["topk10"]["bytes_sent"] < 0.2 * dense


def test_topk_compress_is_a_partition_keeping_the_largest() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1000, generator=g, dtype=torch.float64)
    idx, vals, res = topk_compress(a, 37)
    back = res.clone()
    back[idx] += vals
    assert torch.equal(back, a)
    assert (res[idx] == 0).all() and res.count_nonzero() == 1000 - 37
    assert a.abs()[idx].min() >= res.abs().max()


def test_state_options_are_checked_and_warmup_follows_dgc() -> None:
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(DistributedError, match="density"):
            TopKState(density=bad)
    with pytest.raises(DistributedError, match="momentum"):
        TopKState(density=0.1, momentum=1.0)
    with pytest.raises(DistributedError, match="clip_norm"):
        TopKState(density=0.1, clip_norm=0)
    with pytest.raises(DistributedError, match="value_dtype"):
        TopKState(density=0.1, value_dtype=torch.int8)
    with pytest.raises(DistributedError, match="precondition must be 'none' or 'adam'"):
        TopKState(density=0.1, precondition="sgd")
    with pytest.raises(DistributedError, match="set momentum=0"):
        TopKState(density=0.1, precondition="adam", momentum=0.9)
    for betas in ((1.0, 0.9), (0.9, -0.1)):
        with pytest.raises(DistributedError, match="betas"):
            TopKState(density=0.1, precondition="adam", betas=betas)
    with pytest.raises(DistributedError, match="eps must be positive"):
        TopKState(density=0.1, precondition="adam", eps=0.0)
    st = TopKState(density=0.001, warmup_steps=4)
    assert [round(st.density_at(t), 6) for t in range(6)] == [
        round(0.001 ** (t / 5), 6) for t in (1, 2, 3, 4)] + [0.001, 0.001]
    assert st.k_for(10_000, step=10) == 10 and st.k_for(10, step=10) == 1


def test_register_topk_refuses_a_plain_model() -> None:
    with pytest.raises(DistributedError, match="DistributedDataParallel"):
        register_topk(toy_model(), 0.1)
    with pytest.raises(DistributedError, match="density"):
        register_topk(toy_model(), 2.0)
    with pytest.raises(DistributedError, match="sparsifier= takes"):
        register_topk(toy_model(), 0.1, sparsifier=object())


def _one_rank(rank: int, world: int) -> str:
    ddp = nn.parallel.DistributedDataParallel(toy_model())
    try:
        register_topk(ddp, 0.1)
    except DistributedError as exc:
        return str(exc)
    return "no error"


def test_one_rank_with_a_sparse_hook_is_refused() -> None:
    assert "at least 2 ranks" in run_local(_one_rank, 1, timeout_s=60)[0]
