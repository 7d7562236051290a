"""Pruning at initialisation: exact counts, SynFlow is data-free, SNIP/GraSP use the data."""

import pytest
import torch
from _train_helpers import batches, tiny_mlp

from sparsetorch.patterns import n_pruned
from sparsetorch.training import get_method
from sparsetorch.training.synflow import synflow_scores


@pytest.mark.parametrize("alloc", ["erk", "er", "uniform"])
def test_random_counts_follow_allocation(mlp, alloc):
    sp = get_method("random", sparsity=0.8, allocation=alloc)
    masks = sp.attach(mlp)
    for n, s in sp._layer_sparsities(0.8).items():
        assert int((~masks[n]).sum()) == n_pruned(s, masks[n].numel())
    masks.verify(mlp)


def test_synflow_scores_do_not_depend_on_data(mlp):
    names = [n for n, p in mlp.named_parameters() if p.dim() == 2]
    w0 = {k: v.clone() for k, v in mlp.state_dict().items()}
    a = synflow_scores(mlp, names, (16,))
    assert all(torch.equal(v, w0[k]) for k, v in mlp.state_dict().items())  # scoring is pure
    sp1 = get_method("synflow", sparsity=0.9, iterations=5)
    sp2 = get_method("synflow", sparsity=0.9, iterations=5)
    m2 = tiny_mlp()
    m2.load_state_dict(mlp.state_dict())
    masks1 = sp1.attach(mlp, data=batches(1, seed=1))
    masks2 = sp2.attach(m2, data=[(torch.full((4, 16), 7.0), torch.zeros(4, dtype=torch.long))])
    for n in names:
        assert torch.equal(masks1[n], masks2[n])
    assert masks1.sparsity().overall == pytest.approx(0.9, abs=1e-3)
    assert set(a) == set(names)


def test_synflow_without_input_shape_or_data(mlp):
    from sparsetorch.errors import MethodError

    with pytest.raises(MethodError, match="input_shape"):
        get_method("synflow", sparsity=0.5).attach(mlp)


@pytest.mark.parametrize("method", ["snip", "grasp"])
def test_data_driven_init_exact_global_count(mlp, method):
    sp = get_method(method, sparsity=0.9)
    masks = sp.attach(mlp, data=batches(2))
    total = sum(m.numel() for m in masks.masks.values())
    assert sum(masks.sparsity().zeros.values()) == n_pruned(0.9, total)
    masks.verify(mlp)
    assert all(p.grad is None for p in mlp.parameters())  # scoring does not leave gradients


def test_snip_picks_largest_sensitivity(mlp):
    sp = get_method("snip", sparsity=0.95)
    data = batches(1)
    masks = sp.attach(mlp, data=data)
    sc = sp.scores(data)
    kept_min = min(float(sc[n][masks[n]].min()) for n in sc)
    pruned_max = max(float(sc[n][~masks[n]].max()) for n in sc)
    assert kept_min >= pruned_max


def test_dense_first_last_tokens(cnn):
    """``dense="first"`` keeps the first targeted weight dense (RigL reference's uniform: conv1 dense, rest at s)."""
    sp = get_method("rigl", sparsity=0.8, allocation="uniform", dense="first", total_steps=10)
    masks = sp.attach(cnn)
    names = list(sp.params)
    assert sp.dense_names() == (names[0],) and names[0] == "conv1.weight"
    assert bool(masks[names[0]].all())
    for n in names[1:]:
        assert int((~masks[n]).sum()) == n_pruned(0.8, masks[n].numel())
    # ERK with the last layer forced dense: the other layers absorb its non-zeros, so the total
    # number of zeros is the uniform budget sum_l floor(s * N_l) (reference get_sparsities_erdos_renyi)
    torch.manual_seed(0)
    from _train_helpers import TinyCNN

    sp2 = get_method("random", sparsity=0.8, allocation="erk", dense=["last", "fc2.weight"])
    m2 = sp2.attach(TinyCNN())
    assert sp2.dense_names() == ("fc2.weight",)
    assert bool(m2["fc2.weight"].all())
    budget = sum(n_pruned(0.8, m2[n].numel()) for n in sp2.params)
    assert abs(sum(int((~m2[n]).sum()) for n in sp2.params) - budget) <= len(sp2.params)
