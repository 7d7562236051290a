"""Pruning at initialisation: exact counts, SynFlow is data-free, SNIP/GraSP use the data."""

import math

import pytest
import torch
from _train_helpers import TinyCNN, assert_counts_close, batches, reference_erk_zeros, tiny_mlp

from sparsetorch.patterns import n_pruned
from sparsetorch.training import get_method
from sparsetorch.training.synflow import synflow_scores


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("alloc", ["erk", "er", "uniform"])
def test_random_counts_follow_allocation(request, model, alloc):
    """Per-layer zero counts against the ERK / ER / uniform definitions computed in the test
    (not against ``sp._layer_sparsities``, which is the code under test)."""
    net = request.getfixturevalue(model)
    sp = get_method("random", sparsity=0.8, allocation=alloc)
    masks = sp.attach(net)
    shapes = {n: tuple(p.shape) for n, p in sp.params.items()}
    assert all(len(sh) >= 2 for sh in shapes.values())  # weights only, no biases
    if alloc == "uniform":
        expected = {n: n_pruned(0.8, math.prod(sh)) for n, sh in shapes.items()}
        assert masks.sparsity().zeros == expected
    else:
        expected = reference_erk_zeros(shapes, 0.8, kernel=alloc == "erk")
        assert_counts_close(masks.sparsity().zeros, expected)
        # the point of ER/ERK: denser small layers, sparser big ones (not uniform)
        dens = {n: 1 - expected[n] / math.prod(sh) for n, sh in shapes.items()}
        assert max(dens.values()) - min(dens.values()) > 0.1
        uniform = {n: n_pruned(0.8, math.prod(sh)) for n, sh in shapes.items()}
        assert masks.sparsity().zeros != uniform
    masks.verify(net)


def test_er_ignores_the_conv_kernel_and_erk_does_not(cnn):
    sp_er = get_method("random", sparsity=0.8, allocation="er")
    sp_erk = get_method("random", sparsity=0.8, allocation="erk")
    z_er = sp_er.attach(cnn).sparsity().zeros
    torch.manual_seed(0)
    z_erk = sp_erk.attach(TinyCNN()).sparsity().zeros
    assert z_er != z_erk  # conv kernels: (8+1)/(8*1) for ER vs (8+1+3+3)/(8*1*3*3) for ERK


@pytest.mark.parametrize("sparsity", [0.8, 0.9, 0.95])
def test_erk_makes_conv1_and_fc2_dense_on_the_small_cnn(sparsity):
    """docs/training.md: on the benchmark CNN ERK makes ``conv1`` and ``fc2`` dense by itself
    (their density would exceed 1) at 80, 90 and 95%, the others absorb the budget."""
    from sparsetorch.models import get_model

    model = get_model("cnn")
    for method in ("random", "rigl"):
        sp = get_method(method, sparsity=sparsity, allocation="erk", total_steps=10)
        masks = sp.attach(model)
        assert list(sp.params) == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
        assert bool(masks["conv1.weight"].all()) and bool(masks["fc2.weight"].all())
        assert not masks["conv2.weight"].all() and not masks["fc1.weight"].all()
        shapes = {n: tuple(p.shape) for n, p in sp.params.items()}
        assert_counts_close(masks.sparsity().zeros, reference_erk_zeros(shapes, sparsity))
        total = sum(math.prod(sh) for sh in shapes.values())
        budget = sum(n_pruned(sparsity, math.prod(sh)) for sh in shapes.values())
        assert abs(sum(masks.sparsity().zeros.values()) - budget) <= len(shapes)
        assert masks.sparsity().overall == pytest.approx(budget / total, abs=1e-5)
        sp.detach()


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
    sp2 = get_method("random", sparsity=0.8, allocation="erk", dense=["last", "fc2.weight"])
    m2 = sp2.attach(TinyCNN())
    assert sp2.dense_names() == ("fc2.weight",)
    assert bool(m2["fc2.weight"].all())
    budget = sum(n_pruned(0.8, m2[n].numel()) for n in sp2.params)
    assert abs(sum(int((~m2[n]).sum()) for n in sp2.params) - budget) <= len(sp2.params)
    shapes = {n: tuple(p.shape) for n, p in sp2.params.items()}
    assert_counts_close(m2.sparsity().zeros, reference_erk_zeros(shapes, 0.8, dense=("fc2.weight",)))
