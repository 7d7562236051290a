"""GMP follows Zhu & Gupta's cubic formula at its update steps."""

import pytest
import torch
from _train_helpers import batches, train

from sparsetorch.patterns import n_pruned
from sparsetorch.training import get_method


def cubic(t, si, sf, t0, t1, freq):
    last = t0 + ((t - t0) // freq) * freq if t < t1 else t1
    p = min(max((last - t0) / (t1 - t0), 0.0), 1.0)
    return sf + (si - sf) * (1 - p) ** 3


def test_gmp_cubic_at_update_steps(mlp):
    opt = torch.optim.SGD(mlp.parameters(), lr=0.05, momentum=0.9)
    sp = get_method("gmp", sparsity=0.9, start=2, end=14, frequency=4)
    masks = sp.attach(mlp, opt)
    seen = {}

    def check(changed):
        t = sp.step_count
        if changed:
            s_t = cubic(t, 0.0, 0.9, 2, 14, 4)
            for n, m in masks.items():
                assert int((~m).sum()) == n_pruned(s_t, m.numel()), (t, n)
            seen[t] = s_t
        masks.verify(mlp)

    train(mlp, opt, sp, batches(16), check)
    assert sorted(seen) == [2, 6, 10, 14]
    assert seen[6] == pytest.approx(0.9 + (0 - 0.9) * (1 - 4 / 12) ** 3)
    assert masks.sparsity().overall == pytest.approx(0.9, abs=1e-2)


def test_gmp_pruned_stay_pruned(mlp):
    opt = torch.optim.SGD(mlp.parameters(), lr=0.05)
    sp = get_method("gmp", sparsity=0.8, start=0, end=8, frequency=2)
    masks = sp.attach(mlp, opt)
    prev = {n: m.clone() for n, m in masks.items()}

    def check(changed):
        for n, m in masks.items():
            assert not torch.any(m & ~prev[n])  # nothing regrows
            prev[n] = m.clone()

    train(mlp, opt, sp, batches(10), check)
