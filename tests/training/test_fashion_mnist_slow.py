"""Real data: sparse training on a Fashion-MNIST subset learns and keeps its sparsity (slow, < 1 min).

Measured at this budget (6000 examples, 2 epochs, lr 0.1, seed 0, MLP at 90% ERK): RigL 79.15%;
broken variants of it: growth by random scores (= SET) 76.2%, no mask updates (static) 74.65%,
growth of the *smallest* gradients 61.7% at lr 0.05. The floor sits 2 points below RigL, above
every broken variant. (At the former lr 0.05, RigL reached only 71.05% and a random-growth RigL
64-69%, so the former 70% floor was too close to both.)"""

import pytest
import torch

from sparsetorch.errors import DataError


@pytest.mark.slow
def test_rigl_on_fashion_mnist_subset():
    from sparsetorch.data.fashion_mnist import load_fashion_mnist
    from sparsetorch.models import get_model
    from sparsetorch.training.loop import build_sparsifier, fit

    try:
        train = load_fashion_mnist("train", subset=6000)
        test = load_fashion_mnist("test", subset=2000)
    except DataError as exc:
        pytest.skip(str(exc))
    torch.manual_seed(0)
    model = get_model("mlp")
    steps = 2 * (6000 // 100)
    sp = build_sparsifier("rigl", 0.9, steps, update_every=10)
    res = fit(model, sp, train, test, epochs=2, batch_size=100, lr=0.1, progress=False)
    assert len(sp.history) > 3  # the mask was updated several times
    assert res.sparsity_actual == pytest.approx(0.9, abs=1e-3)
    assert res.accuracy > 77.0, res.accuracy  # chance is 10%; see the module docstring
