"""Dynamic sparse training: exact sparsity at every update, RigL's growth rule, reset of new weights."""

import pytest
import torch
import torch.nn.functional as F
from _train_helpers import assert_counts_close, batches, reference_erk_zeros, train
from torch import nn

from sparsetorch.errors import MethodError
from sparsetorch.patterns import n_pruned
from sparsetorch.training import get_method


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_per_layer_counts_exact_after_every_update(mlp, method):
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sp = get_method(method, sparsity=0.8, update_every=2, total_steps=20, decay="constant")
    masks = sp.attach(mlp, opt)
    # the default allocation is ERK: expected counts from its definition, not from the code
    shapes = {n: tuple(p.shape) for n, p in sp.params.items()}
    expected = reference_erk_zeros(shapes, 0.8)
    assert_counts_close(masks.sparsity().zeros, expected)
    expected = dict(masks.sparsity().zeros)  # and then exactly these counts at every update
    updates = []

    def check(changed):
        updates.append(changed)
        zeros = masks.sparsity().zeros
        assert zeros == expected
        masks.verify(mlp)

    train(mlp, opt, sp, batches(20), check)
    assert sum(updates) == 7  # steps 2, 4, ..., 14 (end = 75% of 20 = 15)


def test_snfs_overall_count_exact(mlp):
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1, momentum=0.9)
    sp = get_method("snfs", sparsity=0.8, update_every=3, total_steps=12)
    masks = sp.attach(mlp, opt)
    total0 = sum(masks.sparsity().zeros.values())
    moved = []

    def check(changed):
        assert sum(masks.sparsity().zeros.values()) == total0
        masks.verify(mlp)
        moved.append(dict(masks.sparsity().zeros))

    train(mlp, opt, sp, batches(12), check)
    assert len({tuple(m.values()) for m in moved}) > 1  # redistribution moved per-layer counts


def test_rigl_grows_where_dense_gradient_is_largest():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(1, 33, dtype=torch.float32).reshape(4, 8) / 32)
    # dL/dW[o, i] = T[i, o] for x = I_8 and loss = sum(lin(x) * T)
    g = torch.Generator().manual_seed(3)
    T = torch.randn(8, 4, generator=g)
    opt = torch.optim.SGD(lin.parameters(), lr=0.0)
    sp = get_method("rigl", sparsity=0.5, allocation="uniform", update_every=1, drop_fraction=0.25,
                    decay="constant", end=10)
    masks = sp.attach(lin, opt)
    old = masks["weight"].clone()
    w_before = lin.weight.detach().clone()
    assert sp.needs_dense_grad()
    (lin(torch.eye(8)) * T).sum().backward()
    opt.step()
    assert sp.step()
    new = masks["weight"]
    dense_grad = T.t().abs()
    nnz = int(old.sum())
    k = int(0.25 * nnz)
    # drop: the k smallest |W| among active; grow: k largest |grad| outside the kept set
    active_vals = torch.where(old, w_before.abs(), torch.tensor(float("inf")))
    dropped = torch.zeros_like(old).reshape(-1)
    dropped[active_vals.reshape(-1).argsort()[:k]] = True
    kept = old & ~dropped.reshape(old.shape)
    cand = torch.where(kept, torch.tensor(-1.0), dense_grad)
    grown = torch.zeros_like(old).reshape(-1)
    grown[cand.reshape(-1).argsort(descending=True)[:k]] = True
    assert torch.equal(new, kept | grown.reshape(old.shape))
    assert int(new.sum()) == nnz


def test_regrown_weights_zero_and_adam_moments_reset(mlp):
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-2)
    sp = get_method("rigl", sparsity=0.7, update_every=3, drop_fraction=0.5, decay="constant", end=100)
    masks = sp.attach(mlp, opt)
    data = batches(3)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(mlp(x), y).backward()
        opt.step()
        before = {n: m.clone() for n, m in masks.items()}
        changed = sp.step()
    assert changed
    n_new = 0
    for n, p in sp.params.items():
        grown = masks[n] & ~before[n]
        n_new += int(grown.sum())
        assert torch.all(p[grown] == 0)
        st = opt.state[p]
        assert torch.all(st["exp_avg"][grown] == 0)
        assert torch.all(st["exp_avg_sq"][grown] == 0)
    assert n_new > 0


def test_on_mask_change_is_called_with_grown_and_pruned_positions(mlp):
    """A registered state reset (e.g. a communication hook's residuals) sees every grown position
    and every pruned one at each mask change, and nothing else; a non-callable is refused."""
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    sp = get_method("rigl", sparsity=0.7, update_every=2, drop_fraction=0.5, decay="constant", end=100)
    masks = sp.attach(mlp, opt)
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    sp.on_mask_change(lambda p, where: calls.append((p, where.clone())))
    before = {n: m.clone() for n, m in masks.items()}
    changes = 0

    def check(changed):
        nonlocal changes
        if changed:
            changes += 1
            by_param = {id(p): w for p, w in calls}
            for n, p in sp.params.items():
                grown = masks[n] & ~before[n]
                assert torch.equal(by_param[id(p)], grown | ~masks[n]), n
        calls.clear()
        before.update({n: m.clone() for n, m in masks.items()})

    train(mlp, opt, sp, batches(4), check)
    assert changes > 0
    with pytest.raises(MethodError, match="callable"):
        sp.on_mask_change("reset")


def test_set_regrown_momentum_reset(mlp):
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1, momentum=0.9)
    sp = get_method("set", sparsity=0.7, update_every=2, drop_fraction=0.5, decay="constant", end=100)
    masks = sp.attach(mlp, opt)
    before = {}

    def check(changed):
        if changed:
            for n, p in sp.params.items():
                grown = masks[n] & ~before[n]
                assert torch.all(p[grown] == 0)
                assert torch.all(opt.state[p]["momentum_buffer"][grown] == 0)
        before.update({n: m.clone() for n, m in masks.items()})

    before.update({n: m.clone() for n, m in masks.items()})
    train(mlp, opt, sp, batches(4), check)


def test_rigl_dense_grad_only_kept_on_update_steps(mlp):
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    sp = get_method("rigl", sparsity=0.8, update_every=4, total_steps=40)
    sp.attach(mlp, opt)
    flags = []
    for x, y in batches(8):
        flags.append(sp.needs_dense_grad())
        opt.zero_grad()
        F.cross_entropy(mlp(x), y).backward()
        assert bool(sp._dense_grad) == flags[-1]
        opt.step()
        sp.step()
    assert flags == [False, False, False, True] * 2


def test_rigl_cosine_fraction():
    sp = get_method("rigl", sparsity=0.9, total_steps=1000)
    assert sp.end == 750
    assert sp.fraction(0) == pytest.approx(0.3)
    assert sp.fraction(375) == pytest.approx(0.15)
    assert sp.fraction(750) == pytest.approx(0.0)
    assert not sp.is_update_step(800)


def test_gradient_accumulation_sums_microbatches(mlp):
    import copy

    opt = torch.optim.SGD(mlp.parameters(), lr=0.0)
    sp = get_method("rigl", sparsity=0.8, update_every=1, end=10)
    sp.attach(mlp, opt)
    ref = copy.deepcopy(mlp)  # masked weights, no hooks
    sp.masks.apply(ref)
    (x1, y1), (x2, y2) = batches(2)
    F.cross_entropy(mlp(x1), y1).backward()
    F.cross_entropy(mlp(x2), y2).backward()
    name = "0.weight"
    g = torch.autograd.grad(F.cross_entropy(ref(x1), y1) + F.cross_entropy(ref(x2), y2), ref[0].weight)[0]
    assert torch.allclose(sp._dense_grad[name], g, atol=1e-6)


def test_rigl_with_global_allocation(mlp):
    """``allocation="global"``: one |W| threshold over all layers at attach (counts computed here
    from the definition), the exact global count, and per-layer counts kept through updates."""
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1, momentum=0.9)
    w = {n: p.detach().abs().clone() for n, p in mlp.named_parameters() if p.dim() == 2}
    sp = get_method("rigl", sparsity=0.8, allocation="global", update_every=2, total_steps=20,
                    decay="constant")
    masks = sp.attach(mlp, opt)
    assert set(sp.params) == set(w)
    total = sum(v.numel() for v in w.values())
    k = n_pruned(0.8, total)
    threshold = torch.cat([v.reshape(-1) for v in w.values()]).sort().values[k - 1]
    expected = {n: int((v <= threshold).sum()) for n, v in w.items()}
    assert sum(expected.values()) == k  # no ties in a random init
    zeros = masks.sparsity().zeros
    assert zeros == expected
    assert len(set(round(z / w[n].numel(), 2) for n, z in zeros.items())) > 1  # not uniform
    updates = []

    def check(changed):
        updates.append(changed)
        assert masks.sparsity().zeros == expected
        masks.verify(mlp)

    train(mlp, opt, sp, batches(10), check)
    assert sum(updates) == 5
