"""Children of one parent and iterative Sparse Model Soups, against their definitions.

Each phase prunes by global magnitude to exactly its target count, its mask lies inside the
previous phase's, the phase's model is the parameter mean of its children (uniform) or keeps a
child only when the val score does not drop (greedy), children with different seeds differ, and
bad inputs are refused before anything trains.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsetorch import MaskSet
from sparsetorch.finetune.loop import FinetuneConfig, FinetuneError
from sparsetorch.finetune.soup import (
    ChildSetting,
    SoupError,
    iterative_sms,
    phase_sparsities,
    prune_further,
    train_children,
)
from sparsetorch.patterns import n_pruned

N, D, C, B = 96, 8, 4, 16
_g = torch.Generator().manual_seed(0)
W_TEACHER = torch.randn(D, C, generator=_g)
X = torch.randn(N, D, generator=_g)
Y = (X @ W_TEACHER).argmax(1)
XV = torch.randn(48, D, generator=_g)  # held-out data for val_fn
YV = (XV @ W_TEACHER).argmax(1)


def batch_fn(seed: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch i of the data order of ``seed`` (module level: picklable for processes)."""
    idx = torch.randint(0, N, (B,), generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
    return X[idx], Y[idx]


def loss_fn(model: nn.Module, batch) -> tuple[torch.Tensor, int]:  # noqa: ANN001
    x, y = batch
    return F.cross_entropy(model(x), y), len(y)


def _refuse_to_train(seed: int, i: int):  # noqa: ANN202
    raise AssertionError("an invalid request started training")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, C))


CFG = FinetuneConfig(steps=6, lr=3e-2, batch_size=B, warmup_steps=1)
SEEDS = [ChildSetting(seed=s) for s in range(3)]


@torch.no_grad()
def _val_loss(m: nn.Module) -> float:
    return -float(F.cross_entropy(m(XV), YV))


def _weights(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in m.state_dict().items()}


def test_phases_prune_by_global_magnitude_to_exact_counts_with_nested_masks():
    model = _model()
    goal = phase_sparsities(0.9, 3)
    assert goal[-1] == 0.9 and goal == sorted(goal)
    # every phase prunes the same fraction of what is still kept
    assert (1 - goal[1]) / (1 - goal[0]) == pytest.approx(1 - goal[0])
    res = iterative_sms(model, goal, SEEDS[:2], batch_fn, loss_fn, CFG, how="greedy", val_fn=_val_loss)
    assert [r.sparsity_target for r in res.phases] == goal
    names = list(res.masks.masks)
    assert names == ["0.weight", "2.weight", "4.weight"]  # the default targets of the start
    total = sum(res.masks.masks[n].numel() for n in names)
    prev = {n: torch.ones_like(res.masks.masks[n]) for n in names}
    for rec in res.phases:
        zeros = sum(int((~rec.masks.masks[n]).sum()) for n in names)
        assert zeros == n_pruned(rec.sparsity_target, total)  # exactly the target count
        assert rec.sparsity == zeros / total
        for n in names:  # pruning only removes
            assert not bool((rec.masks.masks[n] & ~prev[n]).any()), n
        prev = rec.masks.masks
        # greedy by construction: the soup is at least as good as its best child
        assert rec.soup_score >= max(rec.child_scores)
        assert rec.used and len(rec.child_scores) == 2 and len(rec.child_losses) == 2
    assert prev is res.masks.masks
    res.masks.verify(res.model)
    for n in names:  # the final soup is exactly as sparse as its mask (no kept weight lost by averaging)
        assert int((res.model.state_dict()[n] != 0).sum()) == int(res.masks.masks[n].sum())
    # phase 1 pruned the start by magnitude: every kept |w| >= every pruned |w|, over all layers
    first = res.phases[0].masks.masks
    sd = model.state_dict()
    kept = torch.cat([sd[n].abs()[first[n]] for n in names])
    pruned = torch.cat([sd[n].abs()[~first[n]] for n in names])
    assert float(kept.min()) >= float(pruned.max())
    # the input model is not changed
    assert all(torch.equal(sd[n], _model().state_dict()[n]) for n in sd)


def test_prune_further_keeps_the_largest_of_the_still_kept_weights():
    m = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[9.0, 1.0, -3.0, 0.5], [-8.0, 2.0, 0.0, 4.0]]))
    # the previous mask pruned the two largest weights (9 and -8): they must stay pruned
    old = MaskSet({"weight": torch.tensor([[False, True, True, True], [False, True, True, True]])})
    new = prune_further(m, old, 0.75)  # 6 zeros of 8: keep the two largest still-kept (-3 and 4)
    assert new.masks["weight"].tolist() == [[False, False, True, False], [False, False, False, True]]
    uni = prune_further(m, old, 0.5, allocation="uniform")  # 4 zeros: keep -3, 4, 2 and 1
    assert uni.masks["weight"].tolist() == [[False, True, True, False], [False, True, False, True]]
    assert torch.equal(m.weight, torch.tensor([[9.0, 1.0, -3.0, 0.5], [-8.0, 2.0, 0.0, 4.0]]))  # unchanged
    # uniform allocation that would have to regrow a weight in a layer already sparser than its share
    two = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    sparse_first = MaskSet({"0.weight": torch.eye(4, dtype=torch.bool), "1.weight": torch.ones(4, 4, dtype=torch.bool)})
    with pytest.raises(SoupError, match=r"0\.weight: pruning to sparsity 0\.5 with allocation 'uniform' would regrow"):
        prune_further(two, sparse_first, 0.5, allocation="uniform")
    glob = prune_further(two, sparse_first, 0.5)  # global: 16 zeros of 32, the 12 old ones among them
    assert sum(glob.sparsity().zeros.values()) == 16
    assert not bool((glob.masks["0.weight"] & ~sparse_first.masks["0.weight"]).any())


def test_uniform_phase_is_the_hand_computed_mean_of_its_children():
    model = _model(1)
    res = iterative_sms(model, [0.6], SEEDS, batch_fn, loss_fn, CFG, how="uniform", val_fn=_val_loss)
    # the same phase by hand: prune by magnitude, train three children, average them
    masks = prune_further(model, MaskSet.from_model(model), 0.6)
    parent = _model(1)
    masks.apply(parent)
    kids = train_children(parent, masks, SEEDS, batch_fn, loss_fn, CFG)
    assert all(torch.equal(masks.masks[n], res.masks.masks[n]) for n in masks.masks)
    got = res.model.state_dict()
    for n, t in got.items():
        want = (kids[0].model.state_dict()[n] + kids[1].model.state_dict()[n] + kids[2].model.state_dict()[n]) / 3
        assert torch.allclose(t, want, atol=1e-6, rtol=0), n
    rec = res.phases[0]
    assert rec.used == [0, 1, 2]
    assert rec.child_scores == [_val_loss(k.model) for k in kids]
    assert rec.soup_score == pytest.approx(_val_loss(res.model))


def test_greedy_keeps_only_children_that_do_not_lower_the_score():
    model = _model(2)
    masks = prune_further(model, MaskSet.from_model(model), 0.5)
    parent = _model(2)
    masks.apply(parent)
    kids = train_children(parent, masks, SEEDS, batch_fn, loss_fn, CFG)
    ref = _weights(kids[1].model)

    def near_child1(m: nn.Module) -> float:  # best = child 1 itself; mixing in any other child is worse
        return -sum(float((t - ref[n]).abs().sum()) for n, t in m.state_dict().items())

    res = iterative_sms(model, [0.5], SEEDS, batch_fn, loss_fn, CFG, how="greedy", val_fn=near_child1)
    rec = res.phases[0]
    assert rec.used == [1]  # children 0 and 2 were rejected
    assert rec.child_scores[1] == 0.0 and rec.child_scores[0] < 0 and rec.child_scores[2] < 0
    assert rec.soup_score == 0.0 >= max(rec.child_scores)
    assert all(torch.equal(res.model.state_dict()[n], ref[n]) for n in ref)

    two = [ChildSetting(0), ChildSetting(1)]
    mean = {n: (kids[0].model.state_dict()[n] + kids[1].model.state_dict()[n]) / 2 for n in ref}

    def near_mean(m: nn.Module) -> float:  # the mean of both beats either child: greedy must take both
        return -sum(float((t - mean[n]).abs().sum()) for n, t in m.state_dict().items())

    both = iterative_sms(model, [0.5], two, batch_fn, loss_fn, CFG, how="greedy", val_fn=near_mean).phases[0]
    assert sorted(both.used) == [0, 1] and both.soup_score > max(both.child_scores)


def test_children_differ_by_seed_and_settings_and_keep_the_mask():
    parent = _model(3)
    masks = prune_further(parent, MaskSet.from_model(parent), 0.7)
    masks.apply(parent)
    before = _weights(parent)
    settings = [ChildSetting(0), ChildSetting(1), ChildSetting(0, lr=1e-3), ChildSetting(0, weight_decay=0.5)]
    kids = train_children(parent, masks, settings, batch_fn, loss_fn, CFG)
    w = [k.model.state_dict()["2.weight"] for k in kids]
    for i in range(4):
        masks.verify(kids[i].model)
        assert not torch.equal(w[i], before["2.weight"])  # every child trained
        for j in range(i):
            assert not torch.equal(w[i], w[j]), (i, j)
    assert max(kids[2].result.lrs) == pytest.approx(1e-3) and max(kids[0].result.lrs) == pytest.approx(CFG.lr)
    assert settings[3].config(CFG).weight_decay == 0.5 and settings[3].config(CFG).seed == 0
    assert all(torch.equal(parent.state_dict()[n], before[n]) for n in before)  # the parent is untouched
    again = train_children(parent, masks, settings[:1], batch_fn, loss_fn, CFG)[0]
    assert torch.equal(again.model.state_dict()["2.weight"], w[0])  # a seed fixes the child


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"settings": []}, "settings is empty: a soup needs k >= 1"),
        ({"settings": [ChildSetting(1), ChildSetting(1)]}, r"settings\[0\] and settings\[1\] are identical"),
        ({"settings": [3]}, r"settings\[0\] is a int, not a ChildSetting"),
        ({"settings": [ChildSetting(2), ChildSetting(2, lr=CFG.lr)]}, r"settings\[0\] and settings\[1\] are identical"),
        ({"sparsities": []}, "non-empty list of phase targets"),
        ({"sparsities": [0.5, 0.5]}, r"must increase phase by phase .* sparsities\[1\]=0.5 <= sparsities\[0\]=0.5"),
        ({"sparsities": [0.7, 0.5]}, "must increase phase by phase"),
        ({"sparsities": [0.5, 1.0]}, r"sparsities\[1\] must be in \[0, 1\)"),
        ({"sparsities": [-0.1]}, r"sparsities\[0\] must be in \[0, 1\)"),
        ({"how": "mean"}, "how must be 'uniform' or 'greedy'"),
        ({"how": "greedy", "val_fn": None}, "greedy soup needs val_fn"),
        ({"processes": 0}, "processes must be a positive integer"),
        ({"allocation": "erdos"}, "allocation must be one of"),
        ({"masks": MaskSet({"0.weight": torch.eye(16, 8, dtype=torch.bool)}), "sparsities": [0.5]},
         r"already at sparsity 0\.9375 but the first phase asks for 0\.5"),
    ],
)
def test_bad_inputs_are_refused_before_training(kwargs, match):
    args = {"sparsities": [0.5, 0.8], "settings": SEEDS[:2], "how": "uniform", "val_fn": _val_loss, **kwargs}
    sp, st = args.pop("sparsities"), args.pop("settings")
    with pytest.raises(SoupError, match=match):
        iterative_sms(_model(), sp, st, _refuse_to_train, loss_fn, CFG, **args)


def test_bad_child_settings_and_configs_are_refused():
    parent = _model()
    masks = MaskSet.from_model(parent)
    with pytest.raises(FinetuneError, match="lr must be a finite number > 0"):
        train_children(parent, masks, [ChildSetting(0), ChildSetting(1, lr=-1.0)], _refuse_to_train, loss_fn, CFG)
    with pytest.raises(FinetuneError, match="weight_decay must be >= 0"):
        iterative_sms(parent, [0.5], [ChildSetting(0, weight_decay=-1.0)], _refuse_to_train, loss_fn, CFG,
                      how="uniform")
    with pytest.raises(SoupError, match="config must be a FinetuneConfig"):
        train_children(parent, masks, SEEDS, _refuse_to_train, loss_fn, {"steps": 3})
    with pytest.raises(SoupError, match="masks must be the parent's MaskSet"):
        train_children(parent, {"0.weight": None}, SEEDS, _refuse_to_train, loss_fn, CFG)
    with pytest.raises(SoupError, match=r"seed must be an integer"):
        train_children(parent, masks, [ChildSetting(0.5)], _refuse_to_train, loss_fn, CFG)
    with pytest.raises(SoupError, match="goal must be in"):
        phase_sparsities(1.0, 3)
    with pytest.raises(SoupError, match="phases must be a positive integer"):
        phase_sparsities(0.9, 0)
    with pytest.raises(SoupError, match="cannot be sent"):  # a lambda cannot go to a spawned process
        train_children(parent, masks, SEEDS[:2], lambda s, i: batch_fn(s, i), loss_fn, CFG, processes=2)


def test_children_in_processes_equal_serial_children():
    parent = _model(4)
    masks = prune_further(parent, MaskSet.from_model(parent), 0.5)
    masks.apply(parent)
    fn = functools.partial(batch_fn)
    serial = train_children(parent, masks, SEEDS[:2], fn, loss_fn, CFG)
    spawned = train_children(parent, masks, SEEDS[:2], fn, loss_fn, CFG, processes=2)
    for a, b in zip(serial, spawned):
        assert a.setting == b.setting and a.result.losses == b.result.losses
        for n, t in a.model.state_dict().items():
            assert torch.equal(t, b.model.state_dict()[n]), n
        masks.verify(b.model)
