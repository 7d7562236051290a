"""IMP rewinding resets weights (and schedule); AC/DC alternates dense and sparse phases."""

import pytest
import torch
from _train_helpers import batches, train

from sparsetorch.training import get_method


def test_imp_weight_rewinding_resets_to_step_k(mlp):
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    sp = get_method("imp", sparsity=0.5, rate=0.2, rewind_step=2, scheduler=sched)
    masks = sp.attach(mlp, opt)
    data = batches(6)
    snap = None
    for b in data:
        train(mlp, opt, sp, [b])
        sched.step()
        if sp.step_count == 2:
            snap = {k: v.clone() for k, v in mlp.state_dict().items()}
    lr_at_k = 0.1 * 0.5  # StepLR after 2 steps
    start = sp.next_round()
    assert start == 2 and sp.step_count == 2
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_at_k)
    assert len(opt.state) == 0
    total = sum(m.numel() for m in masks.masks.values())
    assert sum(masks.sparsity().zeros.values()) == -(-2 * total // 10)  # ceil(0.2 * N)
    for k, v in mlp.state_dict().items():
        if k in masks:
            assert torch.equal(v, snap[k] * masks[k])
        else:
            assert torch.equal(v, snap[k])
    masks.verify(mlp)


@pytest.mark.parametrize("rewind", ["weights", "lr"])
def test_imp_round_resets_registered_state(mlp, rewind):
    """on_mask_change callbacks see every pruned position at a round, and every position of every
    parameter when the weights are rewound (their old state belongs to another trajectory)."""
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    sp = get_method("imp", sparsity=0.5, rate=0.2, rewind=rewind)
    masks = sp.attach(mlp, opt)
    calls = {}
    sp.on_mask_change(lambda p, where: calls.__setitem__(id(p), where.clone()))
    train(mlp, opt, sp, batches(2))
    assert not calls  # no mask change while training a round
    sp.next_round()
    for n, p in mlp.named_parameters():
        if rewind == "weights":
            assert torch.equal(calls[id(p)], torch.ones_like(p, dtype=torch.bool)), n
        elif n in masks:
            assert torch.equal(calls[id(p)], ~masks[n]), n
        else:
            assert id(p) not in calls, n


def test_imp_lr_rewinding_keeps_weights_and_density_schedule(mlp):
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    sp = get_method("imp", sparsity=0.5, rate=0.2, rewind="lr")
    assert sp.rounds == 4  # 0.8^4 = 0.41 <= 0.5
    masks = sp.attach(mlp, opt)
    trained = []

    def run(start):
        train(mlp, opt, sp, batches(2))
        trained.append({n: p.detach().clone() for n, p in sp.params.items()})

    hist = sp.run(run)
    assert [round(h, 2) for h in hist] == [0.2, 0.36, 0.49, 0.59]
    # lr rewinding: surviving weights after round 1 are the trained ones
    assert len(trained) == 5
    masks.verify(mlp)


def test_acdc_phases(mlp):
    opt = torch.optim.SGD(mlp.parameters(), lr=0.05)
    sp = get_method("acdc", sparsity=0.75, warmup=2, phase=2, final=3, total_steps=11)
    masks = sp.attach(mlp, opt)
    dens = []
    train(mlp, opt, sp, batches(11), lambda c: dens.append(round(masks.sparsity().overall, 2)))
    # steps 1: dense; 2-3 compressed; 4-5 dense; 6-7 compressed; 8-10 final compressed
    assert dens == [0.0, 0.75, 0.75, 0.0, 0.0, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75]
