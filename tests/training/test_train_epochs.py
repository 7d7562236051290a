"""training.loop.train_epochs: the epoch loop fit and dp_fit share (one step and one scheduler
step per batch, batches drawn once per epoch, accuracy after each epoch)."""

from __future__ import annotations

import torch
from torch import nn

from sparsetorch.training.loop import sparsity_report, train_epochs


def test_train_epochs_steps_each_batch_then_the_scheduler_and_evaluates_each_epoch() -> None:
    model = nn.Linear(3, 2)
    x = torch.randn(10, 3)
    test = (x, torch.zeros(10, dtype=torch.long))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    events: list[str] = []
    draws = []

    def draw_epoch():
        draws.append(len(events))
        return torch.arange(10).split(4)  # 3 batches

    def step(idx: torch.Tensor) -> torch.Tensor:
        events.append(f"step{len(idx)}@{opt.param_groups[0]['lr']:g}")
        opt.step()
        return torch.tensor(float(len(idx)), requires_grad=True) * 1.0

    accs, seconds = train_epochs(model, test, 2, draw_epoch, step, sched, total=6, postfix_every=2,
                                 progress=False)
    assert draws == [0, 3]
    lrs = [0.1 * 0.5**k for k in range(6)]
    assert events == [f"step{n}@{lr:g}" for n, lr in zip([4, 4, 2] * 2, lrs)]
    assert len(accs) == 2 and all(0.0 <= a <= 100.0 for a in accs) and seconds >= 0.0
    assert model.training


def test_sparsity_report_of_a_dense_run() -> None:
    assert sparsity_report(nn.Linear(2, 2), None) == (0.0, {})
