"""N:M training: SR-STE masks are N:M after every step; STE trains pruned weights; progressive stages."""

import pytest
import torch
from _train_helpers import batches, train

from sparsetorch.patterns import NM
from sparsetorch.training import get_method
from sparsetorch.training.nm_progressive import stages


@pytest.mark.parametrize("method", ["srste", "ste"])
def test_mask_is_nm_after_every_step(cnn, method):
    opt = torch.optim.SGD(cnn.parameters(), lr=0.2, momentum=0.9)
    sp = get_method(method, pattern="2:4")
    masks = sp.attach(cnn, opt)
    assert "conv1.weight" in sp.skipped  # c_in = 1 cannot be 2:4
    flips = []

    def check(changed):
        flips.append(changed)
        masks.verify(cnn)
        for n, p in sp.params.items():
            assert NM(2, 4).violation(p != 0) is None
            assert masks.sparsity().per_layer[n] == pytest.approx(0.5)

    train(cnn, opt, sp, batches(6, (1, 8, 8)), check)
    assert any(flips)  # masks move while training (dense weights keep learning)


def test_ste_gradient_reaches_pruned_weights(mlp):
    opt = torch.optim.SGD(mlp.parameters(), lr=0.5)
    sp = get_method("ste", pattern="2:4")
    masks = sp.attach(mlp, opt)
    name = "2.weight"
    before = sp.dense_weights[name].clone()
    pruned = ~masks[name].clone()
    train(mlp, opt, sp, batches(1))
    assert not torch.equal(sp.dense_weights[name][pruned], before[pruned])


def test_srste_decay_term_shrinks_pruned_weights(mlp):
    # with zero data gradient (lr on a zero loss) only the decay term acts on pruned weights
    opt = torch.optim.SGD(mlp.parameters(), lr=1.0)
    sp = get_method("srste", pattern="2:4", decay=0.1)
    masks = sp.attach(mlp, opt)
    name = "0.weight"
    w0 = sp.dense_weights[name].clone()
    pruned = ~masks[name].clone()
    opt.zero_grad()
    (mlp(torch.zeros(1, 16)).sum() * 0).backward()
    opt.step()
    sp.step()
    assert torch.allclose(sp.dense_weights[name][pruned], (w0 * 0.9)[pruned])


def test_progressive_stages():
    assert stages(2, 4, "sparsify") == [(3, 4), (2, 4)]
    assert stages(1, 8, "sparsify") == [(7, 8), (4, 8), (2, 8), (1, 8)]
    assert stages(2, 4, "fine") == [(16, 32), (8, 16), (4, 8), (2, 4)]


def test_progressive_moves_from_dense_to_target(mlp):
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    sp = get_method("nm_progressive", pattern="1:4", dense_steps=2, finetune_steps=2, total_steps=10)
    masks = sp.attach(mlp, opt)
    seen = []

    def check(changed):
        masks.verify(mlp)
        seen.append(round(masks.sparsity().overall, 4))

    assert masks.sparsity().overall == 0.0
    train(mlp, opt, sp, batches(10), check)
    assert seen[0] == 0.0 and seen[-1] == pytest.approx(0.75)
    assert seen == sorted(seen) and 0.25 in seen and 0.5 in seen
    assert all(str(p) == "1:4" for p in masks.patterns.values())
