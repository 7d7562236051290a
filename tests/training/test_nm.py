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


def test_mask_decay_schedule_definition():
    sp = get_method("nm_decay", pattern="2:4", dense_steps=2, finetune_steps=3, total_steps=15)
    span = 15 - 2 - 3
    assert sp.beta(0) == sp.beta(1) == 1.0
    assert sp.beta(2) == pytest.approx(1.0)
    # default exp coefficient: beta reaches 0.01 when fine-tuning starts
    assert sp.beta(2 + 4) == pytest.approx(0.01 ** (4 / span))
    assert sp.beta(11) == pytest.approx(0.01 ** (9 / span))
    assert sp.beta(12) == sp.beta(14) == 0.0
    lin = get_method("nm_decay", decay_type="linear", decay_coef=0.2, total_steps=20, finetune_steps=5)
    assert [lin.beta(t) for t in (0, 1, 4, 5, 14, 15)] == pytest.approx([1.0, 0.8, 0.2, 0.0, 0.0, 0.0])


def test_mask_decay_forward_scales_pruned_weights_then_is_nm(mlp):
    """The parameter is W ⊙ (M + (1 − M)·β_t), M the 2:4 mask of |W|; N:M exact once β = 0."""
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1, momentum=0.9)
    sp = get_method("nm_decay", pattern="2:4", dense_steps=1, finetune_steps=3, total_steps=10)
    masks = sp.attach(mlp, opt)
    seen = []

    def check(changed):
        masks.verify(mlp)
        beta = sp.beta(sp.step_count)
        seen.append(beta)
        for n, p in sp.params.items():
            w = sp.dense_weights[n]
            m = NM(2, 4).mask(w.abs(), None)
            assert torch.equal(sp.target_masks[n], m)
            assert torch.allclose(p, w * (m + (~m) * beta), atol=1e-7)
            if beta == 0:
                assert NM(2, 4).violation(p != 0) is None
                assert str(masks.patterns[n]) == "2:4" and masks.sparsity().per_layer[n] == pytest.approx(0.5)
            else:
                assert masks.sparsity().per_layer[n] == 0.0

    train(mlp, opt, sp, batches(10), check)
    assert seen[0] == 1.0 and 0 < seen[3] < 1 and seen[-1] == 0.0
    assert seen == sorted(seen, reverse=True)


def test_mask_decay_bad_options():
    from sparsetorch.errors import MethodError

    with pytest.raises(MethodError, match="decay_type"):
        get_method("nm_decay", decay_type="cosine", total_steps=10)
    with pytest.raises(MethodError, match="total_steps"):
        get_method("nm_decay", dense_steps=6, finetune_steps=5, total_steps=10)
    with pytest.raises(MethodError, match="decay_coef"):
        get_method("nm_decay", decay_coef=0.0, total_steps=10)
    with pytest.raises(MethodError, match="total_steps"):
        get_method("nm_decay")


def test_mask_decay_gradient_reaches_dense_weights_unmasked(mlp):
    """Straight-through: the dense shadow W moves by the optimizer's full step on W ⊙ (M + (1−M)β)."""
    lr = 0.3
    opt = torch.optim.SGD(mlp.parameters(), lr=lr)
    sp = get_method("nm_decay", pattern="2:4", dense_steps=0, finetune_steps=2, total_steps=10)
    sp.attach(mlp, opt)
    x, y = batches(1)[0]
    for _ in range(3):
        before = {n: w.clone() for n, w in sp.dense_weights.items()}
        opt.zero_grad()
        torch.nn.functional.cross_entropy(mlp(x), y).backward()
        grads = {n: p.grad.clone() for n, p in sp.params.items()}
        opt.step()
        sp.step()
        for n in sp.params:
            assert torch.allclose(sp.dense_weights[n], before[n] - lr * grads[n], atol=1e-6), n
