"""docs/training.md: "any ``torch.optim`` optimizer works". Beyond SGD/Adam/AdamW (tested elsewhere):
pruned weights stay exactly zero after every step (weight decay included), per-layer counts stay
exact, and a regrown weight starts at 0 with every per-element optimizer state reset."""

from __future__ import annotations

import pytest
import torch
from _train_helpers import batches, train

from sparsetorch.training import get_method

OPTIMIZERS = {
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.9, weight_decay=1e-2),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-1, weight_decay=1e-2),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=1e-2, weight_decay=1e-2),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=1e-2, weight_decay=1e-2),
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=1e-2, weight_decay=1e-2),
    "asgd": lambda ps: torch.optim.ASGD(ps, lr=1e-1, t0=0, weight_decay=1e-2),
    "adadelta": lambda ps: torch.optim.Adadelta(ps, lr=1.0, weight_decay=1e-2),
}


@pytest.mark.parametrize("method", ["rigl", "set"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_any_torch_optimizer_keeps_masks(mlp, name, method):
    opt = OPTIMIZERS[name](mlp.parameters())
    sp = get_method(method, sparsity=0.8, update_every=2, drop_fraction=0.5, decay="constant", end=100)
    masks = sp.attach(mlp, opt)
    zeros0 = dict(masks.sparsity().zeros)
    w0 = {n: p.detach().clone() for n, p in sp.params.items()}
    before = {n: m.clone() for n, m in masks.items()}
    seen = {"updates": 0, "grown": 0}

    def check(changed):
        for n, p in sp.params.items():
            assert bool((p[~masks[n]] == 0).all()), (name, n)  # zeros stay zero, decay or not
        assert masks.sparsity().zeros == zeros0
        if changed:
            seen["updates"] += 1
            for n, p in sp.params.items():
                grown = masks[n] & ~before[n]
                seen["grown"] += int(grown.sum())
                assert bool((p[grown] == 0).all())
                for key, v in opt.state[p].items():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape:
                        assert bool((v[grown] == 0).all()), (name, key)
        before.update({n: m.clone() for n, m in masks.items()})
        masks.verify(mlp)

    train(mlp, opt, sp, batches(6), check)
    assert seen["updates"] == 3 and seen["grown"] > 0
    # the kept weights did train
    assert any(not torch.equal(p[masks[n]], w0[n][masks[n]]) for n, p in sp.params.items())
