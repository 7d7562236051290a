"""Data-free one-shot pruning through the public ``sparsetorch.prune`` API."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sparsetorch
from sparsetorch.errors import MethodError, PatternError, SparsityValueError, TargetError


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def test_magnitude_per_layer_threshold():
    model = _mlp()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    rep = sparsetorch.prune(model, "magnitude", 0.6)
    for n in ("0.weight", "2.weight"):
        w, d = dict(model.named_parameters())[n], dense[n]
        zeros = w == 0
        assert int(zeros.sum()) == math.floor(0.6 * w.numel())
        assert d.abs()[~zeros].min() >= d.abs()[zeros].max()  # smallest |w| removed
        assert torch.equal(w[~zeros], d[~zeros])  # survivors unchanged
    assert torch.equal(model[0].bias, dense["0.bias"])  # biases untouched
    assert rep.sparsity_actual == (math.floor(0.6 * 512) + math.floor(0.6 * 256)) / 768
    rep.masks.verify(model)


def test_magnitude_nm_and_implied_sparsity():
    model = _mlp()
    rep = sparsetorch.prune(model, "magnitude", None, "1:4")
    assert rep.sparsity_actual == pytest.approx(0.75)
    assert rep.masks["0.weight"].reshape(32, 4, 4).sum(-1).eq(1).all()


def test_global_allocation_keeps_target():
    model = _mlp()
    rep = sparsetorch.prune(model, "magnitude", 0.7, allocation="global")
    assert rep.sparsity_actual == pytest.approx(0.7, abs=1e-3)


def test_random_is_seeded():
    a, b = _mlp(), _mlp()
    ra = sparsetorch.prune(a, "random", 0.5, seed=3)
    rb = sparsetorch.prune(b, "random", 0.5, seed=3)
    assert all(torch.equal(ra.masks[n], rb.masks[n]) for n in ra.masks)


@pytest.mark.parametrize(
    ("kwargs", "err"),
    [
        ({"sparsity": 1.0}, SparsityValueError),
        ({"sparsity": -0.2}, SparsityValueError),
        ({"pattern": "3-4"}, PatternError),
        ({"pattern": "2:3", "sparsity": None}, PatternError),  # 16 and 32 inputs not multiples of 3
        ({"method": "magnitud"}, MethodError),
        ({"targets": ["0.wieght"]}, TargetError),
    ],
)
def test_bad_input_typed_errors(kwargs, err):
    args = {"method": "magnitude", "sparsity": 0.5, **kwargs}
    with pytest.raises(err):
        sparsetorch.prune(_mlp(), **args)


def test_no_prunable_layers():
    with pytest.raises(TargetError, match="no prunable"):
        sparsetorch.prune(nn.Sequential(nn.Embedding(5, 4)), "magnitude", 0.5)


def test_conv_nm():
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 1))
    rep = sparsetorch.prune(model, "magnitude", 0.5, "2:4")
    rep.masks.verify(model)
    assert rep.sparsity_actual == pytest.approx(0.5)
