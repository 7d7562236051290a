"""Masks under FSDP2 on gloo (CPU): sharded like their parameters, enforced through AdamW with
weight decay, saved with DCP by 2 ranks and loaded by 3 with identical masks and weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from sparsetorch.distributed import run_local
from sparsetorch.masks import MaskSet

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):  # pragma: no cover - torch before 2.6
    pytest.skip("torch.distributed.fsdp.fully_shard is missing", allow_module_level=True)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 3))  # 7 and 3 rows: uneven shards


def _full_masks(model: nn.Module) -> MaskSet:
    g = torch.Generator().manual_seed(1)
    return MaskSet({n: torch.rand(p.shape, generator=g) < 0.5 for n, p in model.named_parameters() if p.dim() == 2})


def _shard(world: int) -> tuple[nn.Module, MaskSet, MaskSet]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from sparsetorch.distributed.fsdp import shard_masks

    mesh = init_device_mesh("cpu", (world,))
    model = _model()
    full = _full_masks(model)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, full, shard_masks(full, model)


def _train_and_save(rank: int, world: int, ck: str) -> dict:
    from sparsetorch.distributed.fsdp import save_sharded

    model, full, masks = _shard(world)
    params = dict(model.named_parameters())
    local_rows = {n: list(m.to_local().shape) for n, m in masks.items()}
    assert all(list(params[n].to_local().shape) == local_rows[n] for n in masks.names())
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    masks.enforce(model, opt)
    for step in range(4):
        g = torch.Generator().manual_seed(10 * step + rank)
        nn.functional.mse_loss(model(torch.randn(4, 10, generator=g)), torch.randn(4, 3, generator=g)).backward()
        opt.step()
        opt.zero_grad()
    masks.verify(model)  # whole tensors: every pruned weight exactly zero
    save_sharded(ck, model, opt, masks)
    return {"sparsity": masks.sparsity().overall, "local_rows": local_rows,
            "weights": {n: p.full_tensor().clone() for n, p in params.items()},
            "full_sparsity": full.sparsity().overall}


def _load(rank: int, world: int, ck: str) -> dict:
    from sparsetorch.distributed.fsdp import load_sharded

    model, full, placeholder = _shard(world)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    loaded = load_sharded(ck, model, opt, placeholder)
    loaded.verify(model)
    return {"masks": {n: m.full_tensor().clone() for n, m in loaded.items()},
            "local_rows": {n: list(m.to_local().shape) for n, m in loaded.items()},
            "weights": {n: p.full_tensor().clone() for n, p in model.named_parameters()}}


def test_masks_shard_train_save_on_2_and_reload_on_3_ranks(tmp_path: Path) -> None:
    ck = str(tmp_path / "dcp")
    two = run_local(_train_and_save, 2, (ck,), timeout_s=120)
    # sparsity from the whole masks: the same on every rank and equal to the unsharded masks'
    assert two[0]["sparsity"] == two[1]["sparsity"] == two[0]["full_sparsity"]
    assert two[0]["local_rows"]["0.weight"] == [4, 10] and two[1]["local_rows"]["0.weight"] == [3, 10]
    for n, w in two[0]["weights"].items():
        assert torch.equal(two[1]["weights"][n], w)
    three = run_local(_load, 3, (ck,), timeout_s=120)
    full = _full_masks(_model())
    assert [r["local_rows"]["0.weight"] for r in three] == [[3, 10], [3, 10], [1, 10]]
    for r in three:
        for n in full.names():
            assert torch.equal(r["masks"][n], full[n])
        for n, w in two[0]["weights"].items():
            assert torch.equal(r["weights"][n], w)


def _dst_fsdp(rank: int, world: int, method: str) -> dict:
    """RigL/SET under FSDP2: the same model, batches and settings as the DDP definition test."""
    from test_ddp_masks import STEPS, _batch, _method
    from test_ddp_masks import _model as ddp_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from sparsetorch.distributed import attach, mask_digests, verify_consistent

    model = ddp_model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = _method(method)
    attach(sp, model, opt, data=[_batch(-1, rank)])
    digests = [mask_digests(sp.masks).tolist()]
    for step in range(STEPS):
        x, y = _batch(step, rank)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if sp.step():
            verify_consistent(sp.masks)
            digests.append(mask_digests(sp.masks).tolist())
    sp.masks.verify(model)
    return {"digests": digests, "sharded": type(next(iter(sp.masks.masks.values()))).__name__,
            "params": {n: p.full_tensor().clone() for n, p in model.named_parameters()}}


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_dst_under_fsdp2_equals_one_process_on_the_union_of_the_batches(method: str) -> None:
    """Definition (as for DDP): FSDP2's reduce-scattered gradient is the union's gradient, and
    drop/grow rank whole layers (shards gathered on update steps only)."""
    from test_ddp_masks import _train

    two = run_local(_dst_fsdp, 2, (method,), timeout_s=150)
    one = _train(method, False, 1, 0)
    assert two[0]["sharded"] == "DTensor"
    assert two[0]["digests"] == two[1]["digests"] == one["digests"]
    assert len({tuple(d) for d in one["digests"]}) > 2  # the masks did change
    for n, p in one["params"].items():
        torch.testing.assert_close(two[0]["params"][n], p, rtol=1e-10, atol=1e-12)
